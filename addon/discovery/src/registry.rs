//! The proxies connected right now and the versions they acked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use serde::Serialize;

use crate::Metrics;

/// One connected proxy, as `trellis check` and the admin endpoint show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyStatus {
    /// SPIFFE ID from the proxy's client certificate: who the proxy is.
    pub identity: String,
    /// Workload (pod) name from the Hello. Informational: the proxy says it, nothing proves it.
    pub workload: String,
    /// Proxy build version from the Hello. Informational.
    pub proxy_version: String,
    /// Where the proxy says its metrics can be read (`ip:port`, path `/metrics`); empty
    /// when it did not say. Informational.
    pub metrics_address: String,
    /// The proxy's admin listener (`ip:port`), as it says. Informational.
    pub admin_address: String,
    /// The remote socket address of the stream's connection, if the acceptor knew it.
    pub remote: Option<SocketAddr>,
    /// When the stream's Hello arrived.
    pub connected_since: SystemTime,
    /// Version of the last response sent on the stream (0 before the first).
    pub sent_version: u64,
    /// The version whose view the proxy holds once it acks `sent_version`: later than
    /// `sent_version` when changes since touched nothing the proxy sees.
    pub view_version: u64,
    /// The last version the proxy acked, if any.
    pub acked_version: Option<u64>,
    /// The last version the proxy refused, and why.
    pub last_nack: Option<(u64, String)>,
    /// Filled in by [`DiscoveryService::proxies`](crate::DiscoveryService::proxies): the
    /// proxy acked all it was sent, refused none of it, and holds the current view.
    pub synced: bool,
}

/// Shared table of connected proxies, keyed by a per-stream id so that two streams from
/// the same identity (a proxy reconnecting before the old stream is noticed gone) are
/// tracked apart.
#[derive(Debug, Clone, Default)]
pub(crate) struct Proxies {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    by_stream: BTreeMap<u64, ProxyStatus>,
}

/// A stream's entry in [`Proxies`]; dropping it (the stream task ending, whichever way)
/// removes the entry and lowers the connected gauge, so no exit path can leak either.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    proxies: Proxies,
    metrics: Metrics,
    version: crate::metrics::VersionLabel,
}

// === impl Proxies ===

impl Proxies {
    /// Adds a connected proxy.
    pub(crate) fn register(&self, status: ProxyStatus, metrics: &Metrics) -> Registration {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let version = metrics.proxy_joined(&status.proxy_version);
        inner.by_stream.insert(id, status);
        metrics.connected_proxies.inc();
        Registration {
            id,
            proxies: self.clone(),
            metrics: metrics.clone(),
            version,
        }
    }

    /// Every connected proxy, in connection order.
    pub(crate) fn list(&self) -> Vec<ProxyStatus> {
        self.lock().by_stream.values().cloned().collect()
    }

    /// The table is only touched in short, non-panicking critical sections, so a poisoned
    /// lock still holds consistent data and is used as is.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Registration ===

impl Registration {
    /// Changes this stream's entry.
    pub(crate) fn update(&self, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.proxies.lock().by_stream.get_mut(&self.id) {
            f(status);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.proxies.lock();
        inner.by_stream.remove(&self.id);
        self.metrics.connected_proxies.dec();
        // Under the table's lock, as in `register`: a join and a leave of one version
        // cannot interleave between the decrement and the removal of its series.
        self.metrics.proxy_left(&self.version);
        drop(inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(identity: &str) -> ProxyStatus {
        ProxyStatus {
            identity: identity.into(),
            workload: "web-1".into(),
            proxy_version: "0.1.0".into(),
            metrics_address: String::new(),
            admin_address: String::new(),
            remote: None,
            connected_since: SystemTime::UNIX_EPOCH,
            sent_version: 0,
            view_version: 0,
            acked_version: None,
            last_nack: None,
            synced: false,
        }
    }

    #[test]
    fn dropping_a_registration_removes_only_its_entry() {
        let proxies = Proxies::default();
        let metrics = Metrics::default();
        let first = proxies.register(status("a"), &metrics);
        let second = proxies.register(status("a"), &metrics);
        second.update(|s| s.acked_version = Some(3));
        assert_eq!(metrics.connected_proxies.get(), 2);

        drop(first);
        let left = proxies.list();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].acked_version, Some(3));
        assert_eq!(metrics.connected_proxies.get(), 1);

        drop(second);
        assert!(proxies.list().is_empty());
        assert_eq!(metrics.connected_proxies.get(), 0);
    }
}
