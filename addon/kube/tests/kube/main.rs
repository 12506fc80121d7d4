//! `trellis-kube` against a Kubernetes API that lives in the test process (there is no
//! cluster here): `fake` is an in-memory API server answering LIST and WATCH per kind,
//! `mock` scripts the ConfigMap's requests one by one over `tower_test::mock`.
//!
//! One binary, so the kube-rs stack is built and linked once.

// A failed expectation in a test should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod fake;
mod mock;
mod scenarios;
mod support;
