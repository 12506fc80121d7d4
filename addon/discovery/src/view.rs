//! What each proxy is allowed and needs to see of the mesh.

use trellis_api::MeshSnapshot;
use trellis_identity::SpiffeId;

/// The part of `snapshot` that the proxy running as `proxy` receives.
///
/// Today this is every service in the mesh: any proxy may call any service, and
/// authorization happens at the destination's inbound side. It is its own function so
/// that later work can narrow it (only the services a workload's routes reference,
/// Sidecar-like egress scoping) without touching the streaming code, which sends diffs of
/// whatever this returns. Must stay pure: the server calls it on every snapshot change for
/// every connected proxy.
pub fn view_for(snapshot: &MeshSnapshot, proxy: &SpiffeId) -> MeshSnapshot {
    let _ = proxy;
    snapshot.clone()
}

#[cfg(test)]
mod tests {
    use trellis_api::{Service, ServiceKey};

    use super::*;

    #[test]
    fn every_proxy_sees_every_service() -> Result<(), trellis_identity::SpiffeError> {
        let mut snapshot = MeshSnapshot {
            version: 7,
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        for (ns, name) in [("demo", "web"), ("other", "db")] {
            let key = ServiceKey::new(ns, name);
            let svc = Service {
                key: key.clone(),
                hostnames: Vec::new(),
                ports: Vec::new(),
                addresses: Vec::new(),
            };
            snapshot.services.insert(key, svc);
        }
        let proxy = SpiffeId::new("cluster.local", "demo", "web")?;
        assert_eq!(view_for(&snapshot, &proxy), snapshot);
        Ok(())
    }
}
