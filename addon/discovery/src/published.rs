//! The mesh as discovery serves it: built once per change, shared by every stream.
//!
//! A naive server gives each stream its own copy of the mesh and diffs copies on every
//! change: with 1,000 proxies and 10,000 endpoints that is a gigabyte of copies and a
//! second of comparisons per endpoint change. Instead, the first stream to notice a new
//! snapshot builds a [`Published`] from the previous one, under a lock, and every other
//! stream reuses it:
//!
//! - each service is converted to its protobuf form once and kept behind an `Arc` until
//!   it changes, together with the version it last changed at;
//! - a bounded change log records which service changed (or went) at which version, so a
//!   stream that sent version `v` finds what to send next by reading the log back to `v`:
//!   the cost of a push is the size of the change, not of the mesh;
//! - a stream that fell behind the log's horizon, or whose view was reset (versions went
//!   backwards after a source restart, the trust domain changed, the scope changed), gets
//!   a full view instead;
//! - authorization policies are kept per namespace, in protobuf form, with the version
//!   each namespace's set last changed at. A proxy receives only the policies of its own
//!   namespace and of the root namespace (`trellis-system`,
//!   [`AuthorizationPolicy::concerns_namespace`]), whatever the discovery scope: a full
//!   view always carries that set (possibly empty), an increment carries it whole when
//!   either namespace's set changed since the proxy's version, and a change of policies
//!   alone is pushed only to the proxies it concerns.
//! - HTTP routes are few and change rarely: they are kept as one set with the version it
//!   last changed at. A proxy receives the producer routes (those in the namespace of a
//!   Service they attach to) and the routes of its own namespace
//!   ([`HttpRoute`] semantics are in `trellis_api::route`); a change of routes is pushed to
//!   every proxy, each getting its own set whole.
//!
//! Each stream keeps only the version (and epoch) its proxy holds, never a copy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use prost::Message;

use tokio::sync::watch;
use trellis_api::authz::{AuthorizationPolicy, ROOT_NAMESPACE};
use trellis_api::discovery::v1 as pb;
use trellis_api::parts::DEFAULT_PART_BYTES;
use trellis_api::route::HttpRoute;
use trellis_api::{MeshSnapshot, ServiceKey, Trust};

use crate::scope::Scope;

/// Changes remembered for incremental pushes. A stream further behind than this gets a
/// full view: by then a full view is the cheaper message anyway.
pub(crate) const MAX_LOG: usize = 4096;

/// What a stream's proxy holds: the version it was last brought to, in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) epoch: u64,
    pub(crate) version: u64,
}

/// One service as served.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) proto: Arc<pb::Service>,
    /// `proto.encoded_len()`, kept to size parts without walking the message again.
    pub(crate) encoded_len: usize,
    /// The version this service last changed at: a proxy that acked this version (or a
    /// later one) has it.
    pub(crate) changed_at: u64,
}

/// The authorization policies of one namespace as served.
#[derive(Debug, Clone)]
pub(crate) struct NamespacePolicies {
    /// Sorted by name; empty once the namespace's last policy went (kept until no proxy
    /// can hold a version from before that).
    protos: Arc<Vec<pb::AuthorizationPolicy>>,
    /// The version this namespace's set last changed at.
    changed_at: u64,
}

/// The mesh at one version, ready to serve.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    /// The snapshot this was built from (kept to compare the next one against).
    source: Arc<MeshSnapshot>,
    scope: Arc<Scope>,
    pub(crate) epoch: u64,
    pub(crate) version: u64,
    pub(crate) services: BTreeMap<ServiceKey, Entry>,
    trust_changed_at: u64,
    /// The version the mesh-wide proxy settings (outbound traffic policy, access log)
    /// last changed at.
    settings_changed_at: u64,
    /// Authorization policies by namespace.
    policies: BTreeMap<String, NamespacePolicies>,
    /// The version the routes last changed at.
    routes_changed_at: u64,
    /// (version, service) for every upsert and removal, oldest first.
    log: VecDeque<(u64, ServiceKey)>,
    /// Deltas can be computed from versions at or after this one.
    horizon: u64,
}

/// What to send a stream next.
#[derive(Debug)]
pub(crate) enum Push {
    /// Nothing in the proxy's view changed: no message, and the proxy's base moves on.
    Nothing,
    /// A response to send.
    Send(pb::DiscoveryResponse),
    /// A full view, to send part by part.
    Full(FullParts),
}

/// A full view as parts of about `max_bytes`, each built when it is asked for (a full
/// view of a large mesh is megabytes as one value; as parts, a few of them are alive at
/// a time). Yields at least one part; every part but the last has `more = true`.
#[derive(Debug)]
pub(crate) struct FullParts {
    published: Arc<Published>,
    namespace: String,
    max_bytes: usize,
    /// The last service sent, once the first part is out.
    after: Option<ServiceKey>,
    started: bool,
    done: bool,
}

impl FullParts {
    pub(crate) fn new(published: Arc<Published>, namespace: &str, max_bytes: usize) -> Self {
        Self {
            published,
            namespace: namespace.to_owned(),
            max_bytes,
            after: None,
            started: false,
            done: false,
        }
    }
}

impl Iterator for FullParts {
    type Item = pb::DiscoveryResponse;

    fn next(&mut self) -> Option<pb::DiscoveryResponse> {
        use std::ops::Bound::{Excluded, Unbounded};
        if self.done {
            return None;
        }
        let p = &self.published;
        let mut part = if self.started {
            pb::DiscoveryResponse {
                version: p.version,
                ..Default::default()
            }
        } else {
            p.header(&self.namespace)
        };
        self.started = true;
        let mut size = part.encoded_len();
        let rest = match &self.after {
            None => p.services.range::<ServiceKey, _>(..),
            Some(after) => p
                .services
                .range::<ServiceKey, _>((Excluded(after), Unbounded)),
        };
        let all = p.scope.is_all();
        for (key, entry) in rest {
            if !all && !p.in_scope(&self.namespace, key) {
                continue;
            }
            // Tag and length prefix: at most 11 bytes more than the message.
            let len = entry.encoded_len + 11;
            if size + len > self.max_bytes && !part.upserts.is_empty() {
                part.more = true;
                return Some(part);
            }
            size += len;
            part.upserts.push((*entry.proto).clone());
            self.after = Some(key.clone());
        }
        self.done = true;
        Some(part)
    }
}

/// The shared, lazily built [`Published`].
#[derive(Debug)]
pub(crate) struct Hub {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    scope: watch::Receiver<Arc<Scope>>,
    current: Mutex<Option<Arc<Published>>>,
}

// === impl Entry ===

impl Entry {
    fn new(svc: &trellis_api::Service, changed_at: u64) -> Self {
        let proto = pb::Service::from(svc);
        Self {
            encoded_len: proto.encoded_len(),
            proto: Arc::new(proto),
            changed_at,
        }
    }
}

// === impl NamespacePolicies ===

/// `policies` grouped by namespace, each group sorted by name (the snapshot's order,
/// which is not relied on).
fn by_namespace(policies: &[AuthorizationPolicy]) -> BTreeMap<&str, Vec<&AuthorizationPolicy>> {
    let mut groups: BTreeMap<&str, Vec<&AuthorizationPolicy>> = BTreeMap::new();
    for p in policies {
        groups.entry(p.namespace.as_str()).or_default().push(p);
    }
    for group in groups.values_mut() {
        group.sort_by(|a, b| a.name.cmp(&b.name));
    }
    groups
}

impl NamespacePolicies {
    fn new(policies: &[&AuthorizationPolicy], changed_at: u64) -> Self {
        Self {
            protos: Arc::new(
                policies
                    .iter()
                    .map(|p| pb::AuthorizationPolicy::from(*p))
                    .collect(),
            ),
            changed_at,
        }
    }
}

// === impl Hub ===

impl Hub {
    pub(crate) fn new(
        snapshots: watch::Receiver<Arc<MeshSnapshot>>,
        scope: watch::Receiver<Arc<Scope>>,
    ) -> Self {
        Self {
            snapshots,
            scope,
            current: Mutex::new(None),
        }
    }

    /// The published form of the newest snapshot and scope, built here if no stream has
    /// built it yet.
    pub(crate) fn latest(&self) -> Arc<Published> {
        // Held while building so that the work is done once, by whichever stream is first;
        // the others wait a millisecond and reuse it. No await happens under the lock.
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = self.snapshots.borrow().clone();
        let scope = self.scope.borrow().clone();
        if let Some(published) = current.as_ref()
            && Arc::ptr_eq(&published.source, &snapshot)
            && Arc::ptr_eq(&published.scope, &scope)
        {
            return published.clone();
        }
        let next = Arc::new(match current.as_deref() {
            Some(previous) => previous.next(snapshot, scope),
            None => Published::first(snapshot, scope, 0),
        });
        *current = Some(next.clone());
        next
    }
}

// === impl Published ===

impl Published {
    /// Built from nothing: every service changed at this version, no history.
    fn first(source: Arc<MeshSnapshot>, scope: Arc<Scope>, epoch: u64) -> Self {
        let version = source.version;
        let services = source
            .services
            .iter()
            .map(|(key, svc)| {
                let entry = Entry::new(svc, version);
                (key.clone(), entry)
            })
            .collect();
        let policies = by_namespace(&source.authorization)
            .into_iter()
            .map(|(ns, set)| (ns.to_owned(), NamespacePolicies::new(&set, version)))
            .collect();
        Self {
            source,
            scope,
            epoch,
            version,
            services,
            trust_changed_at: version,
            settings_changed_at: version,
            policies,
            routes_changed_at: version,
            log: VecDeque::new(),
            horizon: version,
        }
    }

    /// The next version: unchanged services keep their protobuf and change version.
    fn next(&self, source: Arc<MeshSnapshot>, scope: Arc<Scope>) -> Self {
        let version = source.version;
        // Versions that do not move forward (a restarted source counting from 1), a new
        // trust domain or a new scope: every proxy's view is rebuilt from scratch.
        if version <= self.version
            || source.trust_domain != self.source.trust_domain
            || *scope != *self.scope
        {
            return Self::first(source, scope, self.epoch + 1);
        }
        let mut next = self.clone();
        next.version = version;
        for (key, svc) in &source.services {
            if self.source.services.get(key) == Some(svc) {
                continue;
            }
            next.services.insert(key.clone(), Entry::new(svc, version));
            next.log.push_back((version, key.clone()));
        }
        for key in self.source.services.keys() {
            if !source.services.contains_key(key) {
                next.services.remove(key);
                next.log.push_back((version, key.clone()));
            }
        }
        while next.log.len() > MAX_LOG {
            if let Some((dropped, _)) = next.log.pop_front() {
                next.horizon = dropped;
            }
        }
        if source.trust != self.source.trust {
            next.trust_changed_at = version;
        }
        if (source.outbound, source.access_log, &source.tracing)
            != (
                self.source.outbound,
                self.source.access_log,
                &self.source.tracing,
            )
        {
            next.settings_changed_at = version;
        }
        if source.authorization != self.source.authorization {
            let old = by_namespace(&self.source.authorization);
            let new = by_namespace(&source.authorization);
            for (ns, set) in &new {
                if old.get(ns) != Some(set) {
                    next.policies
                        .insert((*ns).to_owned(), NamespacePolicies::new(set, version));
                }
            }
            for ns in old.keys().filter(|ns| !new.contains_key(*ns)) {
                next.policies
                    .insert((*ns).to_owned(), NamespacePolicies::new(&[], version));
            }
        }
        if source.routes != self.source.routes {
            next.routes_changed_at = version;
        }
        // An emptied namespace is remembered only while a proxy may hold a version from
        // before it emptied; past the horizon such a proxy gets a full view anyway.
        let horizon = next.horizon;
        next.policies
            .retain(|_, set| !set.protos.is_empty() || set.changed_at > horizon);
        next.source = source;
        next.scope = scope;
        next
    }

    /// Where a stream that was just brought up to date stands.
    pub(crate) fn base(&self) -> Base {
        Base {
            epoch: self.epoch,
            version: self.version,
        }
    }

    fn trust(&self) -> &Trust {
        &self.source.trust
    }

    /// Whether a proxy in `namespace` receives `key`.
    pub(crate) fn in_scope(&self, namespace: &str, key: &ServiceKey) -> bool {
        self.scope.allows(namespace, &key.namespace)
    }

    /// The whole view of a proxy in `namespace`, as one message.
    #[cfg(test)]
    pub(crate) fn full(&self, namespace: &str) -> pb::DiscoveryResponse {
        let all = self.scope.is_all();
        let upserts = self
            .services
            .iter()
            .filter(|(key, _)| all || self.in_scope(namespace, key))
            .map(|(_, entry)| (*entry.proto).clone())
            .collect();
        pb::DiscoveryResponse {
            upserts,
            ..self.header(namespace)
        }
    }

    /// The first part of a full view for a proxy in `namespace`, without services: the
    /// trust bundle and the authorization policies it enforces.
    fn header(&self, namespace: &str) -> pb::DiscoveryResponse {
        pb::DiscoveryResponse {
            version: self.version,
            full: true,
            upserts: Vec::new(),
            removed: Vec::new(),
            trust_domain: self.source.trust_domain.clone(),
            trust_roots_der: self.trust().roots_der.clone(),
            ca_generation: self.trust().generation,
            more: false,
            outbound_traffic_policy: self.outbound_wire(),
            access_log: self.access_log_wire(),
            tracing: self.source.tracing.to_wire(),
            authorization: Some(self.authorization_wire(namespace)),
            routes: Some(self.routes_wire(namespace)),
        }
    }

    /// The routes a proxy in `namespace` may apply: every producer route, and the
    /// consumer routes of its own namespace, sorted by namespace and name.
    fn routes_wire(&self, namespace: &str) -> pb::HttpRoutes {
        let concerns = |r: &HttpRoute| {
            r.namespace == namespace || r.parents.iter().any(|p| p.service.namespace == r.namespace)
        };
        pb::HttpRoutes {
            routes: self
                .source
                .routes
                .iter()
                .filter(|r| concerns(r))
                .map(pb::HttpRoute::from)
                .collect(),
        }
    }

    /// The namespaces whose policies a proxy in `namespace` enforces, in order.
    fn policy_namespaces(namespace: &str) -> impl Iterator<Item = &str> {
        let mut namespaces = [namespace, ROOT_NAMESPACE];
        namespaces.sort_unstable();
        let twice = namespace == ROOT_NAMESPACE;
        namespaces.into_iter().skip(usize::from(twice))
    }

    /// The policies a proxy in `namespace` enforces, sorted by namespace and name.
    fn authorization_wire(&self, namespace: &str) -> pb::AuthorizationPolicies {
        pb::AuthorizationPolicies {
            policies: Self::policy_namespaces(namespace)
                .filter_map(|ns| self.policies.get(ns))
                .flat_map(|set| set.protos.iter().cloned())
                .collect(),
        }
    }

    /// Whether the policies a proxy in `namespace` enforces changed after `version`.
    fn policies_changed_since(&self, namespace: &str, version: u64) -> bool {
        Self::policy_namespaces(namespace)
            .filter_map(|ns| self.policies.get(ns))
            .any(|set| set.changed_at > version)
    }

    /// The outbound traffic policy as every response carries it.
    fn outbound_wire(&self) -> i32 {
        pb::OutboundTrafficPolicy::from(self.source.outbound).into()
    }

    /// The access log setting as every response carries it.
    fn access_log_wire(&self) -> i32 {
        pb::AccessLog::from(self.source.access_log).into()
    }

    /// What takes a proxy in `namespace` holding `base` to this version.
    pub(crate) fn push_from(self: &Arc<Self>, base: Base, namespace: &str) -> Push {
        let full = || Push::Full(FullParts::new(self.clone(), namespace, DEFAULT_PART_BYTES));
        if base.epoch != self.epoch || base.version < self.horizon {
            return full();
        }
        if base.version >= self.version {
            return Push::Nothing;
        }
        let trust_changed = self.trust_changed_at > base.version;
        // An increment without roots means "unchanged": a bundle that became empty
        // needs a full view (see `trellis_api::diff`).
        if trust_changed && self.trust().roots_der.is_empty() {
            return full();
        }
        let changed: BTreeSet<&ServiceKey> = self
            .log
            .iter()
            .rev()
            .take_while(|(version, _)| *version > base.version)
            .map(|(_, key)| key)
            .filter(|key| self.in_scope(namespace, key))
            .collect();
        // New proxy settings alone are worth a push: every response carries them.
        let settings_changed = self.settings_changed_at > base.version;
        // So are new policies, for the proxies that enforce them.
        let policies_changed = self.policies_changed_since(namespace, base.version);
        let routes_changed = self.routes_changed_at > base.version;
        if changed.is_empty()
            && !trust_changed
            && !settings_changed
            && !policies_changed
            && !routes_changed
        {
            return Push::Nothing;
        }
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for key in changed {
            match self.services.get(key) {
                Some(entry) => upserts.push((*entry.proto).clone()),
                // Sent even if the proxy never had it (added and removed since its
                // version): removing an unknown key is a no-op on the proxy.
                None => removed.push(key.to_string()),
            }
        }
        let (trust_roots_der, ca_generation) = if trust_changed {
            (self.trust().roots_der.clone(), self.trust().generation)
        } else {
            (Vec::new(), 0)
        };
        Push::Send(pb::DiscoveryResponse {
            version: self.version,
            full: false,
            upserts,
            removed,
            trust_domain: self.source.trust_domain.clone(),
            trust_roots_der,
            ca_generation,
            more: false,
            outbound_traffic_policy: self.outbound_wire(),
            access_log: self.access_log_wire(),
            tracing: self.source.tracing.to_wire(),
            authorization: policies_changed.then(|| self.authorization_wire(namespace)),
            routes: routes_changed.then(|| self.routes_wire(namespace)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_api::{Endpoint, Protocol, Service, ServicePort, apply};

    use super::*;

    fn service(ns: &str, name: &str, ip: u8) -> Service {
        Service {
            key: ServiceKey::new(ns, name),
            hostnames: Vec::new(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
                endpoints: vec![Endpoint {
                    address: ([10, 0, 0, ip], 8080).into(),
                    identity: format!("spiffe://cluster.local/ns/{ns}/sa/{name}"),
                    workload: format!("{name}-1"),
                    labels: BTreeMap::new(),
                }],
            }],
            addresses: Vec::new(),
        }
    }

    fn snapshot(version: u64, services: &[Service]) -> Arc<MeshSnapshot> {
        Arc::new(MeshSnapshot {
            version,
            trust_domain: "cluster.local".into(),
            services: services
                .iter()
                .map(|s| (s.key.clone(), s.clone()))
                .collect(),
            ..Default::default()
        })
    }

    fn push(p: &Published, base: Base, ns: &str) -> Push {
        Arc::new(p.clone()).push_from(base, ns)
    }

    fn response(push: Push) -> Option<pb::DiscoveryResponse> {
        match push {
            Push::Nothing => None,
            Push::Send(resp) => Some(resp),
            Push::Full(parts) => {
                let mut assembler = trellis_api::Parts::default();
                parts
                    .filter_map(|part| assembler.push(part).ok().flatten())
                    .last()
            }
        }
    }

    /// What a proxy in `ns` should hold of `snap` under `scope`.
    fn view(snap: &MeshSnapshot, scope: &Scope, ns: &str) -> MeshSnapshot {
        let mut view = snap.clone();
        view.services
            .retain(|key, _| scope.allows(ns, &key.namespace));
        view.authorization.retain(|p| p.concerns_namespace(ns));
        view
    }

    /// An ALLOW policy `ns/name` whose one rule allows `principal`.
    fn policy(ns: &str, name: &str, principal: &str) -> AuthorizationPolicy {
        use trellis_api::authz::{Action, Pattern, Rule, Source};
        AuthorizationPolicy {
            namespace: ns.into(),
            name: name.into(),
            target_services: Vec::new(),
            action: Action::Allow,
            dry_run: false,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![Pattern::Exact(principal.into())],
                    namespaces: Vec::new(),
                }],
                to: Vec::new(),
            }],
        }
    }

    /// `snapshot(version, services)` with `policies` (sorted here, as translate sorts).
    fn with_policies(
        version: u64,
        services: &[Service],
        mut policies: Vec<AuthorizationPolicy>,
    ) -> Arc<MeshSnapshot> {
        policies.sort();
        Arc::new(MeshSnapshot {
            authorization: policies,
            ..(*snapshot(version, services)).clone()
        })
    }

    /// The keys of the policies a response carries; `None` when it carries none.
    fn policy_keys(resp: &pb::DiscoveryResponse) -> Option<Vec<String>> {
        resp.authorization.as_ref().map(|set| {
            set.policies
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect()
        })
    }

    /// A route `ns/name` attached to `parent` (`<ns>/<name>`), sending everything there.
    fn route(ns: &str, name: &str, parent: &str) -> HttpRoute {
        use trellis_api::route::{Backend, RouteParent, RouteRule};
        let parent = ServiceKey::parse(parent).unwrap_or_else(|| ServiceKey::new("?", "?"));
        HttpRoute {
            namespace: ns.into(),
            name: name.into(),
            parents: vec![RouteParent {
                service: parent.clone(),
                port: None,
            }],
            rules: vec![RouteRule {
                name: String::new(),
                matches: Vec::new(),
                backends: vec![Backend {
                    service: parent,
                    port: 80,
                    weight: 1,
                }],
                timeout: None,
            }],
        }
    }

    /// Producer routes reach every proxy, consumer routes only their namespace's; a
    /// change of routes is pushed whole, and an unrelated change leaves them out.
    #[test]
    fn proxies_get_producer_routes_and_their_own_namespace_routes() {
        let scope = Arc::new(Scope::all());
        let services = [service("a", "web", 1), service("b", "db", 2)];
        let keys = |resp: &pb::DiscoveryResponse| {
            resp.routes.as_ref().map(|set| {
                set.routes
                    .iter()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .collect::<Vec<_>>()
            })
        };
        let mut routes = vec![
            route("a", "web-split", "a/web"),
            route("b", "web-for-b", "a/web"),
            route("c", "web-for-c", "a/web"),
        ];
        routes.sort();
        let v1 = Arc::new(MeshSnapshot {
            routes: routes.clone(),
            ..(*snapshot(1, &services)).clone()
        });
        let first = Published::first(v1, scope.clone(), 0);
        let some = |v: &[&str]| Some(v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(keys(&first.full("a")), some(&["a/web-split"]));
        assert_eq!(
            keys(&first.full("b")),
            some(&["a/web-split", "b/web-for-b"])
        );

        // A service change alone carries no routes.
        let v2 = Arc::new(MeshSnapshot {
            routes: routes.clone(),
            ..(*snapshot(2, &[service("a", "web", 5), service("b", "db", 2)])).clone()
        });
        let second = first.next(v2, scope.clone());
        let resp = response(push(&second, first.base(), "b"));
        assert_eq!(resp.as_ref().and_then(keys), None);

        // A route change reaches every proxy, each with its own set.
        routes.retain(|r| r.name != "web-for-b");
        let v3 = Arc::new(MeshSnapshot {
            routes,
            ..(*snapshot(3, &[service("a", "web", 5), service("b", "db", 2)])).clone()
        });
        let third = second.next(v3, scope);
        let resp = response(push(&third, second.base(), "b"));
        assert_eq!(resp.as_ref().and_then(keys), some(&["a/web-split"]));
        let resp = response(push(&third, second.base(), "c"));
        assert_eq!(
            resp.as_ref().and_then(keys),
            some(&["a/web-split", "c/web-for-c"])
        );
    }

    /// A proxy that applies every push lands exactly on its view of the newest snapshot,
    /// from every starting version, in and out of scope; pushes carry only what changed.
    #[test]
    fn pushes_from_any_base_reach_the_view() -> Result<(), trellis_api::ConvertError> {
        let scope = Arc::new(Scope::own_namespace());
        let (a, b, c) = (
            service("a", "web", 1),
            service("b", "db", 2),
            service("a", "x", 3),
        );
        let snaps = [
            snapshot(1, &[a, b.clone()]),
            snapshot(2, &[service("a", "web", 9), b]),
            snapshot(
                3,
                &[service("a", "web", 9), service("b", "db", 7), c.clone()],
            ),
            snapshot(4, &[service("b", "db", 7), c]),
        ];
        let mut published = vec![Published::first(snaps[0].clone(), scope.clone(), 0)];
        for snap in &snaps[1..] {
            let next = published[published.len() - 1].next(snap.clone(), scope.clone());
            published.push(next);
        }
        let newest = &published[3];
        for ns in ["a", "b"] {
            for (i, from) in published.iter().enumerate() {
                let held = apply(&MeshSnapshot::default(), &from.full(ns))?;
                let got = match response(push(newest, from.base(), ns)) {
                    Some(resp) => {
                        assert!(!resp.full, "from v{} in {ns}", i + 1);
                        apply(&held, &resp)?
                    }
                    None => MeshSnapshot {
                        version: newest.version,
                        ..held
                    },
                };
                let want = view(&snaps[3], &scope, ns);
                assert_eq!(got.services, want.services, "from v{} in {ns}", i + 1);
            }
        }
        // Namespace b only saw db change at v3: from v3, nothing to send there.
        assert!(response(push(&published[3], published[2].base(), "b")).is_none());
        // v2 -> v3 in namespace a: x added, and web (unchanged since v2) not resent.
        let resp = response(push(&published[2], published[1].base(), "a"));
        let names: Vec<_> = resp
            .iter()
            .flat_map(|r| &r.upserts)
            .map(|s| &s.name)
            .collect();
        assert_eq!(names, ["x"]);
        Ok(())
    }

    #[test]
    fn unchanged_services_keep_their_protobuf() {
        let scope = Arc::new(Scope::all());
        let (a, b) = (service("a", "web", 1), service("b", "db", 2));
        let first = Published::first(snapshot(1, &[a.clone(), b]), scope.clone(), 0);
        let next = first.next(snapshot(2, &[a, service("b", "db", 3)]), scope);
        let key = ServiceKey::new("a", "web");
        assert!(Arc::ptr_eq(
            &first.services[&key].proto,
            &next.services[&key].proto
        ));
        assert_eq!(next.services[&key].changed_at, 1);
        assert_eq!(next.services[&ServiceKey::new("b", "db")].changed_at, 2);
    }

    #[test]
    fn resets_and_fallen_behind_streams_get_full_views() {
        let scope = Arc::new(Scope::all());
        let a = service("a", "web", 1);
        let first = Published::first(snapshot(5, std::slice::from_ref(&a)), scope.clone(), 0);
        // Versions going backwards: new epoch, full view.
        let restarted = first.next(snapshot(1, std::slice::from_ref(&a)), scope.clone());
        assert_eq!(restarted.epoch, 1);
        assert!(matches!(push(&restarted, first.base(), "a"), Push::Full(_)));
        // A new scope: full view.
        let rescoped = first.next(snapshot(6, &[a]), Arc::new(Scope::own_namespace()));
        assert!(matches!(push(&rescoped, first.base(), "a"), Push::Full(_)));
        // More changes than the log holds: the oldest base is past the horizon.
        let mut p = first.clone();
        for i in 0..=MAX_LOG {
            let svc = service("a", "web", (i % 200) as u8 + 2);
            p = p.next(snapshot(6 + i as u64, &[svc]), scope.clone());
        }
        assert!(matches!(push(&p, first.base(), "a"), Push::Full(_)));
    }

    /// A full view in parts: every part within the size (or a lone service), scope
    /// applied, and reassembled it is exactly the one-message full view.
    #[test]
    fn full_views_go_out_in_parts() -> Result<(), trellis_api::PartsError> {
        let scope = Arc::new(Scope::own_namespace());
        let services: Vec<Service> = (0..300)
            .map(|i| service(["a", "b"][i % 2], &format!("s{i}"), (i % 250) as u8))
            .collect();
        let published = Arc::new(Published::first(snapshot(4, &services), scope, 0));
        let parts: Vec<_> = FullParts::new(published.clone(), "a", 2048).collect();
        assert!(parts.len() > 5, "{} parts", parts.len());
        let mut assembler = trellis_api::Parts::default();
        let mut whole = None;
        for part in parts {
            assert!(part.encoded_len() <= 2048, "{}", part.encoded_len());
            whole = assembler.push(part)?;
        }
        let whole = whole.map(|w| w.upserts.len());
        assert_eq!(whole, Some(150));
        let mut assembler = trellis_api::Parts::default();
        let reassembled = FullParts::new(published.clone(), "a", 2048)
            .filter_map(|part| assembler.push(part).ok().flatten())
            .last();
        assert_eq!(reassembled, Some(published.full("a")));
        // An empty view is still one (full) message.
        let empty = Arc::new(Published::first(
            snapshot(5, &[]),
            Arc::new(Scope::all()),
            0,
        ));
        let parts: Vec<_> = FullParts::new(empty, "a", 2048).collect();
        assert_eq!(parts.len(), 1);
        assert!(parts[0].full && !parts[0].more);
        Ok(())
    }

    /// Policies per namespace: from every base, in every namespace, the pushes land the
    /// proxy exactly on its filtered view (its namespace's policies and the root's), full
    /// views always carry the set, and no response ever carries another namespace's policy.
    #[test]
    fn policy_pushes_from_any_base_reach_the_filtered_view() -> Result<(), trellis_api::ConvertError>
    {
        let scope = Arc::new(Scope::all());
        let a = service("a", "web", 1);
        let svcs = std::slice::from_ref(&a);
        let root = ROOT_NAMESPACE;
        let snaps = [
            with_policies(1, svcs, vec![]),
            with_policies(2, svcs, vec![policy("a", "p1", "x")]),
            with_policies(
                3,
                svcs,
                vec![policy("a", "p1", "x"), policy("b", "p1", "y")],
            ),
            // Root policy added, a's changed: every namespace's view changes.
            with_policies(
                4,
                svcs,
                vec![
                    policy("a", "p1", "z"),
                    policy("b", "p1", "y"),
                    policy(root, "all", "w"),
                ],
            ),
            // A service change only.
            with_policies(
                5,
                &[service("a", "web", 2)],
                vec![
                    policy("a", "p1", "z"),
                    policy("b", "p1", "y"),
                    policy(root, "all", "w"),
                ],
            ),
            // a's last policy goes; b gains one.
            with_policies(
                6,
                &[service("a", "web", 2)],
                vec![
                    policy("b", "p0", "v"),
                    policy("b", "p1", "y"),
                    policy(root, "all", "w"),
                ],
            ),
        ];
        let mut published = vec![Published::first(snaps[0].clone(), scope.clone(), 0)];
        for snap in &snaps[1..] {
            let next = published[published.len() - 1].next(snap.clone(), scope.clone());
            published.push(next);
        }
        let newest = &published[published.len() - 1];
        for ns in ["a", "b", "c", root] {
            for (i, from) in published.iter().enumerate() {
                let full = from.full(ns);
                assert!(full.authorization.is_some(), "full view v{} in {ns}", i + 1);
                let held = apply(&MeshSnapshot::default(), &full)?;
                let got = match response(push(newest, from.base(), ns)) {
                    Some(resp) => {
                        for key in policy_keys(&resp).into_iter().flatten() {
                            assert!(
                                key.starts_with(&format!("{ns}/"))
                                    || key.starts_with(&format!("{root}/")),
                                "{key} sent to {ns}"
                            );
                        }
                        apply(&held, &resp)?
                    }
                    None => MeshSnapshot {
                        version: newest.version,
                        ..held
                    },
                };
                let want = view(&snaps[snaps.len() - 1], &scope, ns);
                assert_eq!(
                    got.authorization,
                    want.authorization,
                    "from v{} in {ns}",
                    i + 1
                );
                assert_eq!(got.services, want.services, "from v{} in {ns}", i + 1);
            }
        }
        // Full views: the own namespace's and the root's, sorted, possibly none.
        let at = |v: usize, ns: &str| policy_keys(&published[v - 1].full(ns));
        assert_eq!(at(1, "a"), Some(vec![]));
        assert_eq!(at(3, "a"), Some(vec!["a/p1".to_owned()]));
        assert_eq!(
            at(6, "b"),
            Some(vec!["b/p0".into(), "b/p1".into(), format!("{root}/all")])
        );
        assert_eq!(at(6, "a"), Some(vec![format!("{root}/all")]));
        assert_eq!(at(6, root), Some(vec![format!("{root}/all")]));
        // An increment carries the set only when it changed for that namespace.
        let step = |v: usize, ns: &str| {
            response(push(&published[v - 1], published[v - 2].base(), ns)).map(|r| policy_keys(&r))
        };
        assert_eq!(step(3, "a"), None, "b's change is nothing to a");
        assert_eq!(step(3, "b"), Some(Some(vec!["b/p1".to_owned()])));
        assert_eq!(
            step(5, "a"),
            Some(None),
            "a service change, policies unchanged"
        );
        assert_eq!(step(5, "b"), Some(None), "every proxy sees a's service");
        assert_eq!(step(6, "a"), Some(Some(vec![format!("{root}/all")])));
        Ok(())
    }

    /// A change of policies alone is pushed, as an increment carrying the new set, to the
    /// proxies it concerns only; a root-namespace change concerns every proxy.
    #[test]
    fn a_policy_only_change_is_pushed_to_the_proxies_it_concerns() {
        let scope = Arc::new(Scope::own_namespace());
        let svcs = [service("a", "web", 1), service("b", "db", 2)];
        let first = Published::first(with_policies(1, &svcs, vec![]), scope.clone(), 0);
        let second = first.next(
            with_policies(2, &svcs, vec![policy("a", "only-a", "x")]),
            scope.clone(),
        );
        match push(&second, first.base(), "a") {
            Push::Send(resp) => {
                assert!(!resp.full && resp.upserts.is_empty(), "{resp:?}");
                assert_eq!(policy_keys(&resp), Some(vec!["a/only-a".to_owned()]));
            }
            other => panic!("expected an increment, got {other:?}"),
        }
        assert!(matches!(push(&second, first.base(), "b"), Push::Nothing));
        let third = second.next(
            with_policies(
                3,
                &svcs,
                vec![
                    policy("a", "only-a", "x"),
                    policy(ROOT_NAMESPACE, "mesh", "y"),
                ],
            ),
            scope.clone(),
        );
        for (ns, want) in [
            (
                "a",
                vec!["a/only-a".to_owned(), format!("{ROOT_NAMESPACE}/mesh")],
            ),
            ("b", vec![format!("{ROOT_NAMESPACE}/mesh")]),
        ] {
            match push(&third, second.base(), ns) {
                Push::Send(resp) => assert_eq!(policy_keys(&resp), Some(want), "{ns}"),
                other => panic!("{ns}: expected an increment, got {other:?}"),
            }
        }
        // Removing every policy is a change too: an empty set, not an absent one.
        let fourth = third.next(with_policies(4, &svcs, vec![]), scope);
        match push(&fourth, third.base(), "b") {
            Push::Send(resp) => assert_eq!(policy_keys(&resp), Some(vec![])),
            other => panic!("expected an increment, got {other:?}"),
        }
    }

    /// A namespace whose policies all went is forgotten once no stream can be behind it.
    #[test]
    fn emptied_namespaces_are_forgotten_past_the_horizon() {
        let scope = Arc::new(Scope::all());
        let mut p = Published::first(
            with_policies(1, &[], vec![policy("a", "p", "x")]),
            scope.clone(),
            0,
        );
        p = p.next(with_policies(2, &[], vec![]), scope.clone());
        assert!(p.policies.get("a").is_some_and(|set| set.protos.is_empty()));
        for i in 0..=MAX_LOG as u64 {
            let svc = service("b", "db", (i % 200) as u8);
            p = p.next(with_policies(3 + i, &[svc], vec![]), scope.clone());
        }
        assert!(p.policies.is_empty(), "{:?}", p.policies.keys());
    }

    /// A new outbound policy alone is pushed to every proxy, as an increment carrying it.
    #[test]
    fn an_outbound_policy_change_alone_is_pushed() {
        let scope = Arc::new(Scope::own_namespace());
        let a = service("a", "web", 1);
        let first = Published::first(snapshot(1, std::slice::from_ref(&a)), scope.clone(), 0);
        let strict = Arc::new(MeshSnapshot {
            outbound: trellis_api::OutboundPolicy::RegistryOnly,
            ..(*snapshot(2, &[a])).clone()
        });
        let next = first.next(strict, scope);
        for ns in ["a", "elsewhere"] {
            match push(&next, first.base(), ns) {
                Push::Send(resp) => {
                    assert!(!resp.full && resp.upserts.is_empty(), "{ns}: {resp:?}");
                    assert_eq!(
                        resp.outbound_traffic_policy,
                        pb::OutboundTrafficPolicy::RegistryOnly as i32
                    );
                }
                other => panic!("{ns}: expected an increment, got {other:?}"),
            }
        }
    }
}
