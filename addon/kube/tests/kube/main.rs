//! `trellis-kube` against a Kubernetes API that lives in the test process (there is no
//! cluster here): `trellis_kube::stand_in` (feature `test-util`) is an in-memory API server
//! answering LIST and WATCH per kind (and GET/POST/PUT of Leases and Events, and of the
//! HTTPRoute `status` subresource), `mock`
//! scripts the ConfigMap's requests one by one over `tower_test::mock`. `leader` and
//! `events` cover leader election and the config Events written by the leader; `publish`
//! the trust bundle the leader keeps in every namespace and webhook configuration; `https`
//! the stand-in's HTTPS front, reached through a kubeconfig as from another process;
//! `policies` the AuthorizationPolicy custom resource, with and without its CRD; `routes`
//! the Gateway API's HTTPRoute, with and without its CRD; `route_status` the HTTPRoute
//! `status.parents` entries the leader writes.
//!
//! One binary, so the kube-rs stack is built and linked once.

// A failed expectation in a test should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod events;
mod https;
mod leader;
mod mock;
mod policies;
mod publish;
mod route_status;
mod routes;
mod scenarios;
mod support;
