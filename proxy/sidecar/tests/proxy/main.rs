//! The proxy's integration tests, in one binary: real inbound and outbound sides over
//! real mTLS, driven through the same watch channels discovery publishes on.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod authorization;
mod routes;
