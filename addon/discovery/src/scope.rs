//! Which services each proxy receives: the discovery scope.
//!
//! Istio's `Sidecar` resource narrows what a proxy is told about to cut its memory and the
//! control plane's fan-out; this is the same idea, mesh-wide and by namespace, set in the
//! `trellis-config` ConfigMap (`discovery.scope`). A proxy always sees its own namespace
//! and [`CONTROL_PLANE_NAMESPACE`]; beyond that, its namespace's entry, or the default.
//! Authorization is not scoping: a proxy that is not told about a service cannot route to
//! it by name, but the destination's inbound side still decides who may call it.

use std::collections::{BTreeMap, BTreeSet};

/// The add-on's namespace: every proxy sees its services.
pub const CONTROL_PLANE_NAMESPACE: &str = "trellis-system";

/// The discovery scope of the whole mesh. The default sees everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    default: NamespaceSet,
    namespaces: BTreeMap<String, NamespaceSet>,
}

/// Namespaces whose services a proxy receives, besides its own and the control plane's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NamespaceSet {
    /// Every namespace.
    #[default]
    All,
    /// Only these.
    Only(BTreeSet<String>),
}

// === impl Scope ===

impl Scope {
    /// Every proxy sees every service (the default).
    pub fn all() -> Self {
        Self::default()
    }

    /// Every proxy sees only its own namespace and the control plane's.
    pub fn own_namespace() -> Self {
        Self::new(NamespaceSet::Only(BTreeSet::new()), BTreeMap::new())
    }

    /// `default` for proxies in namespaces without an entry in `namespaces`.
    pub fn new(default: NamespaceSet, namespaces: BTreeMap<String, NamespaceSet>) -> Self {
        Self {
            default,
            namespaces,
        }
    }

    /// Whether a proxy in `proxy_namespace` receives services of `service_namespace`.
    pub fn allows(&self, proxy_namespace: &str, service_namespace: &str) -> bool {
        if service_namespace == proxy_namespace || service_namespace == CONTROL_PLANE_NAMESPACE {
            return true;
        }
        self.set_for(proxy_namespace).contains(service_namespace)
    }

    /// The list that applies to proxies in `proxy_namespace` (its own entry, else the
    /// default), without the two namespaces [`Scope::allows`] always adds.
    pub fn set_for(&self, proxy_namespace: &str) -> &NamespaceSet {
        self.namespaces
            .get(proxy_namespace)
            .unwrap_or(&self.default)
    }

    /// True when every proxy sees everything (the default), so checks can be skipped.
    pub fn is_all(&self) -> bool {
        self.default == NamespaceSet::All
            && self
                .namespaces
                .values()
                .all(|set| *set == NamespaceSet::All)
    }
}

// === impl NamespaceSet ===

impl NamespaceSet {
    /// Whether `namespace` is in the set.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.contains(namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(names: &[&str]) -> NamespaceSet {
        NamespaceSet::Only(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn scope_table() {
        let scoped = Scope::new(
            only(&["shared"]),
            BTreeMap::from([
                ("shop".to_owned(), only(&["payments"])),
                ("ops".to_owned(), NamespaceSet::All),
            ]),
        );
        let cases = [
            (Scope::all(), "a", "b", true),
            (Scope::own_namespace(), "a", "a", true),
            (Scope::own_namespace(), "a", "b", false),
            (Scope::own_namespace(), "a", CONTROL_PLANE_NAMESPACE, true),
            (scoped.clone(), "shop", "payments", true),
            (scoped.clone(), "shop", "shared", false),
            (scoped.clone(), "shop", "shop", true),
            (scoped.clone(), "web", "shared", true),
            (scoped.clone(), "web", "payments", false),
            (scoped.clone(), "ops", "payments", true),
        ];
        for (scope, proxy, service, want) in cases {
            assert_eq!(scope.allows(proxy, service), want, "{proxy} -> {service}");
        }
        assert!(Scope::all().is_all());
        assert!(!scoped.is_all());
    }
}
