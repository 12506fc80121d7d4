//! Snapshots on the wire: full views, incremental diffs, and applying either.
//!
//! The control plane sends [`full`] first on every stream and [`diff`] afterwards; the proxy
//! calls [`apply`] on each response it receives. Both sides share this module so that
//! `apply(old, diff(old, new)) == new` holds by construction and is tested in one place.

use std::collections::{BTreeMap, BTreeSet};

use crate::convert::ConvertError;
use crate::discovery::v1 as pb;
use crate::snapshot::{
    AccessLog, MeshSnapshot, OutboundPolicy, Service, ServiceKey, Tracing, Trust,
};

/// Applies a discovery response to the snapshot the proxy holds and returns the new one.
///
/// - `full = true`: the upserts are the whole mesh and replace `current`.
/// - `full = false`: upserts are applied to `current` first, then removals (so a key in
///   both ends up removed). Removing a key `current` does not hold is not an error.
///
/// The trust domain is always the response's. The trust bundle and CA generation are the
/// response's in a full response (no roots there: the control plane has no bundle) and in
/// an increment that carries roots; an increment without roots keeps `current.trust`
/// (empty means "unchanged", and the generation travels with the roots).
///
/// The response's version must be greater
/// than `current.version`, else the response is [`ConvertError::Stale`]: versions only
/// move forward, so the control plane must keep them monotonic across its own restarts.
///
/// Atomic: `current` is never modified; on error the caller keeps using it (and nacks).
pub fn apply(
    current: &MeshSnapshot,
    resp: &pb::DiscoveryResponse,
) -> Result<MeshSnapshot, ConvertError> {
    if resp.version <= current.version {
        return Err(ConvertError::Stale {
            version: resp.version,
            current: current.version,
        });
    }
    let upserts = upserts_from_proto(&resp.upserts)?;
    let removed = resp
        .removed
        .iter()
        .enumerate()
        .map(|(index, key)| {
            ServiceKey::parse(key).ok_or_else(|| ConvertError::BadRemovedKey {
                index,
                value: key.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut services = if resp.full {
        BTreeMap::new()
    } else {
        current.services.clone()
    };
    services.extend(upserts);
    for key in &removed {
        services.remove(key);
    }
    // Replaced whole when present; absent means "none" in a full response and
    // "unchanged" in an increment, like the trust bundle.
    let authorization = match &resp.authorization {
        Some(set) => crate::authz::policies_from_wire(set)
            .map_err(|(policy, error)| ConvertError::BadPolicy { policy, error })?,
        None if resp.full => Vec::new(),
        None => current.authorization.clone(),
    };
    let routes = match &resp.routes {
        Some(set) => crate::route::routes_from_wire(set)
            .map_err(|(route, error)| ConvertError::BadRoute { route, error })?,
        None if resp.full => Vec::new(),
        None => current.routes.clone(),
    };
    let trust = if resp.full || !resp.trust_roots_der.is_empty() {
        Trust {
            roots_der: resp.trust_roots_der.clone(),
            generation: resp.ca_generation,
        }
    } else {
        current.trust.clone()
    };
    Ok(MeshSnapshot {
        version: resp.version,
        trust_domain: resp.trust_domain.clone(),
        services,
        trust,
        // Every response carries the policy in force, increments too.
        outbound: OutboundPolicy::from_wire(resp.outbound_traffic_policy),
        access_log: AccessLog::from_wire(resp.access_log),
        tracing: Tracing::from_wire(resp.tracing.as_ref()),
        authorization,
        routes,
    })
}

/// The incremental response that takes a proxy holding `old` to `new` (`full = false`).
///
/// Upserts carry every service that is new or changed in any way, whole; `removed` lists
/// the keys only `old` has. The trust bundle and CA generation are included only when
/// `old.trust != new.trust`, the authorization policies and the routes only when they changed. The
/// response has `new`'s version even when nothing changed; callers that want to skip such
/// pushes check [`same_view`] first.
///
/// One change has no incremental form: to a trust with no roots (an increment without
/// roots means "unchanged"). For that, rare, change the result is [`full`]`(new)`, so
/// `apply(old, diff(old, new)) == new` holds for every pair.
pub fn diff(old: &MeshSnapshot, new: &MeshSnapshot) -> pb::DiscoveryResponse {
    let trust_changed = old.trust != new.trust;
    if trust_changed && new.trust.roots_der.is_empty() {
        return full(new);
    }
    let upserts = new
        .services
        .iter()
        .filter(|(key, svc)| old.services.get(key) != Some(svc))
        .map(|(_, svc)| pb::Service::from(svc))
        .collect();
    let removed = old
        .services
        .keys()
        .filter(|key| !new.services.contains_key(key))
        .map(ToString::to_string)
        .collect();
    let (trust_roots_der, ca_generation) = if trust_changed {
        (new.trust.roots_der.clone(), new.trust.generation)
    } else {
        (Vec::new(), 0)
    };
    pb::DiscoveryResponse {
        version: new.version,
        full: false,
        upserts,
        removed,
        trust_domain: new.trust_domain.clone(),
        trust_roots_der,
        ca_generation,
        more: false,
        outbound_traffic_policy: pb::OutboundTrafficPolicy::from(new.outbound).into(),
        access_log: pb::AccessLog::from(new.access_log).into(),
        tracing: new.tracing.to_wire(),
        authorization: (old.authorization != new.authorization)
            .then(|| crate::authz::policies_to_wire(&new.authorization)),
        routes: (old.routes != new.routes).then(|| crate::route::routes_to_wire(&new.routes)),
    }
}

/// The full response for `snapshot` (`full = true`): every service, the trust bundle with
/// its CA generation, every authorization policy and every route, replacing all state.
pub fn full(snapshot: &MeshSnapshot) -> pb::DiscoveryResponse {
    pb::DiscoveryResponse {
        version: snapshot.version,
        full: true,
        upserts: snapshot.services.values().map(pb::Service::from).collect(),
        removed: Vec::new(),
        trust_domain: snapshot.trust_domain.clone(),
        trust_roots_der: snapshot.trust.roots_der.clone(),
        ca_generation: snapshot.trust.generation,
        more: false,
        outbound_traffic_policy: pb::OutboundTrafficPolicy::from(snapshot.outbound).into(),
        access_log: pb::AccessLog::from(snapshot.access_log).into(),
        tracing: snapshot.tracing.to_wire(),
        authorization: Some(crate::authz::policies_to_wire(&snapshot.authorization)),
        routes: Some(crate::route::routes_to_wire(&snapshot.routes)),
    }
}

/// True when `old` and `new` hold the same view (services, trust domain, trust bundle and
/// CA generation), whatever their versions: pushing [`diff`] of them would change nothing
/// for the proxy.
pub fn same_view(old: &MeshSnapshot, new: &MeshSnapshot) -> bool {
    old.trust_domain == new.trust_domain
        && old.services == new.services
        && old.trust == new.trust
        && old.outbound == new.outbound
        && old.access_log == new.access_log
        && old.tracing == new.tracing
        && old.authorization == new.authorization
        && old.routes == new.routes
}

/// Converts upserts, refusing a service that appears twice: which copy should win is not
/// defined by the contract, so the response is malformed.
fn upserts_from_proto(upserts: &[pb::Service]) -> Result<Vec<(ServiceKey, Service)>, ConvertError> {
    let mut seen = BTreeSet::new();
    upserts
        .iter()
        .map(|proto| {
            let svc = Service::try_from(proto)?;
            if !seen.insert(svc.key.clone()) {
                return Err(ConvertError::DuplicateService { service: svc.key });
            }
            Ok((svc.key.clone(), svc))
        })
        .collect()
}
