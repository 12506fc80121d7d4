//! Conversions between the snapshot types and their protobuf form.
//!
//! Domain -> proto is infallible (`From`). Proto -> domain is validated (`TryFrom`): the
//! proxy must never install a service it could not route, so anything malformed is refused
//! with a [`ConvertError`] that names the service and the field.

use std::net::{IpAddr, SocketAddr};

use crate::discovery::v1 as pb;
use crate::snapshot::{
    AccessLog, Endpoint, OutboundPolicy, Protocol, Service, ServiceKey, ServicePort, Tracing,
};

/// Why a discovery response could not be turned into a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A namespace or name is empty.
    #[error("service {service}: {field} is empty")]
    EmptyField {
        /// The offending service.
        service: ServiceKey,
        /// `namespace` or `name`.
        field: &'static str,
    },
    /// A port is 0 or does not fit in 16 bits.
    #[error("service {service}: {field} = {port} is not a port (1..=65535)")]
    BadPort {
        /// The offending service.
        service: ServiceKey,
        /// Path of the field, e.g. `ports[1].port`.
        field: String,
        /// The value received.
        port: u32,
    },
    /// A protocol other than `http` or `tcp`.
    #[error("service {service}: {field} = {value:?} is not a protocol (\"http\" or \"tcp\")")]
    UnknownProtocol {
        /// The offending service.
        service: ServiceKey,
        /// Path of the field, e.g. `ports[0].protocol`.
        field: String,
        /// The value received.
        value: String,
    },
    /// An endpoint address that is not `ip:port`.
    #[error("service {service}: {field} = {value:?} is not ip:port")]
    BadAddress {
        /// The offending service.
        service: ServiceKey,
        /// Path of the field, e.g. `ports[0].endpoints[2].address`.
        field: String,
        /// The value received.
        value: String,
    },
    /// A service address that is not an IP address.
    #[error("service {service}: {field} = {value:?} is not an IP address")]
    BadIp {
        /// The offending service.
        service: ServiceKey,
        /// Path of the field, e.g. `addresses[1]`.
        field: String,
        /// The value received.
        value: String,
    },
    /// The same service appears twice in one response's upserts.
    #[error("service {service}: upserted twice in one response")]
    DuplicateService {
        /// The repeated service.
        service: ServiceKey,
    },
    /// A removed key that is not `<namespace>/<name>`.
    #[error("removed[{index}] = {value:?} is not <namespace>/<name>")]
    BadRemovedKey {
        /// Position in `removed`.
        index: usize,
        /// The value received.
        value: String,
    },
    /// An authorization policy the proxy cannot enforce as sent.
    #[error("authorization policy {policy}: {error}")]
    BadPolicy {
        /// `<namespace>/<name>` of the policy.
        policy: String,
        /// What is wrong with it.
        error: crate::authz::PolicyError,
    },
    /// An HTTP route the proxy cannot apply as sent.
    #[error("HTTP route {route}: {error}")]
    BadRoute {
        /// `<namespace>/<name>` of the route.
        route: String,
        /// What is wrong with it.
        error: crate::route::RouteError,
    },
    /// A response whose version is not newer than the one held.
    #[error("stale version {version}: already at {current}")]
    Stale {
        /// The response's version.
        version: u64,
        /// The version held.
        current: u64,
    },
}

// === impl Protocol ===

impl Protocol {
    /// The wire name: `"http"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }

    /// Parses a wire name; `None` for anything but `"http"` or `"tcp"`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "http" => Some(Protocol::Http),
            "tcp" => Some(Protocol::Tcp),
            _ => None,
        }
    }
}

// === impl ServiceKey ===

impl ServiceKey {
    /// Parses `<namespace>/<name>`, the form used in `DiscoveryResponse.removed`.
    ///
    /// Both parts must be non-empty and the name may not contain another `/`.
    pub fn parse(key: &str) -> Option<Self> {
        let (namespace, name) = key.split_once('/')?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(Self::new(namespace, name))
    }
}

// === domain -> proto ===

impl From<&Endpoint> for pb::Endpoint {
    fn from(ep: &Endpoint) -> Self {
        Self {
            address: ep.address.to_string(),
            identity: ep.identity.clone(),
            workload: ep.workload.clone(),
            labels: ep.labels.clone(),
        }
    }
}

impl From<&ServicePort> for pb::ServicePort {
    fn from(port: &ServicePort) -> Self {
        Self {
            name: port.name.clone(),
            port: u32::from(port.port),
            protocol: port.protocol.as_str().to_owned(),
            endpoints: port.endpoints.iter().map(pb::Endpoint::from).collect(),
        }
    }
}

impl From<&Service> for pb::Service {
    fn from(svc: &Service) -> Self {
        Self {
            namespace: svc.key.namespace.clone(),
            name: svc.key.name.clone(),
            hostnames: svc.hostnames.clone(),
            ports: svc.ports.iter().map(pb::ServicePort::from).collect(),
            addresses: svc.addresses.iter().map(ToString::to_string).collect(),
        }
    }
}

// === proto -> domain ===

impl TryFrom<&pb::Service> for Service {
    type Error = ConvertError;

    fn try_from(svc: &pb::Service) -> Result<Self, Self::Error> {
        let key = ServiceKey::new(&svc.namespace, &svc.name);
        for (field, value) in [("namespace", &svc.namespace), ("name", &svc.name)] {
            if value.is_empty() {
                return Err(ConvertError::EmptyField {
                    service: key,
                    field,
                });
            }
        }
        let ports = svc
            .ports
            .iter()
            .enumerate()
            .map(|(i, port)| port_from_proto(&key, i, port))
            .collect::<Result<_, _>>()?;
        let addresses = svc
            .addresses
            .iter()
            .enumerate()
            .map(|(i, address)| {
                address.parse::<IpAddr>().map_err(|_| ConvertError::BadIp {
                    service: key.clone(),
                    field: format!("addresses[{i}]"),
                    value: address.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            key,
            hostnames: svc.hostnames.clone(),
            ports,
            addresses,
        })
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ConvertError;

    fn try_from(svc: pb::Service) -> Result<Self, Self::Error> {
        Self::try_from(&svc)
    }
}

/// Ports and endpoints only make sense inside a service, so they convert with the
/// service's key and their position, which the error names.
fn port_from_proto(
    key: &ServiceKey,
    index: usize,
    port: &pb::ServicePort,
) -> Result<ServicePort, ConvertError> {
    let number = u16::try_from(port.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConvertError::BadPort {
            service: key.clone(),
            field: format!("ports[{index}].port"),
            port: port.port,
        })?;
    let protocol =
        Protocol::from_name(&port.protocol).ok_or_else(|| ConvertError::UnknownProtocol {
            service: key.clone(),
            field: format!("ports[{index}].protocol"),
            value: port.protocol.clone(),
        })?;
    let endpoints = port
        .endpoints
        .iter()
        .enumerate()
        .map(|(e, ep)| {
            let address =
                ep.address
                    .parse::<SocketAddr>()
                    .map_err(|_| ConvertError::BadAddress {
                        service: key.clone(),
                        field: format!("ports[{index}].endpoints[{e}].address"),
                        value: ep.address.clone(),
                    })?;
            Ok(Endpoint {
                address,
                identity: ep.identity.clone(),
                workload: ep.workload.clone(),
                labels: ep.labels.clone(),
            })
        })
        .collect::<Result<_, ConvertError>>()?;
    Ok(ServicePort {
        name: port.name.clone(),
        port: number,
        protocol,
        endpoints,
    })
}

// === Tracing ===

impl Tracing {
    /// The wire form: absent when off, so control planes and proxies that predate the
    /// field agree on "off".
    pub fn to_wire(&self) -> Option<pb::Tracing> {
        (*self != Self::default()).then(|| pb::Tracing {
            sampling_per_million: self.sampling_per_million,
            otlp: self.otlp.clone(),
        })
    }

    /// From the wire; absent means off.
    pub fn from_wire(t: Option<&pb::Tracing>) -> Self {
        t.map(|t| Self {
            sampling_per_million: t.sampling_per_million.min(1_000_000),
            otlp: t.otlp.clone(),
        })
        .unwrap_or_default()
    }
}

// === AccessLog ===

impl From<AccessLog> for pb::AccessLog {
    fn from(log: AccessLog) -> Self {
        match log {
            AccessLog::Unset => Self::Unset,
            AccessLog::Text => Self::Text,
            AccessLog::Json => Self::Json,
            AccessLog::Off => Self::Off,
        }
    }
}

impl AccessLog {
    /// The access log a response carries; a value this proxy does not know keeps its own
    /// default (`Unset`): an access log format is not a security decision.
    pub fn from_wire(value: i32) -> Self {
        match pb::AccessLog::try_from(value) {
            Ok(pb::AccessLog::Text) => Self::Text,
            Ok(pb::AccessLog::Json) => Self::Json,
            Ok(pb::AccessLog::Off) => Self::Off,
            Ok(pb::AccessLog::Unset) | Err(_) => Self::Unset,
        }
    }
}

// === OutboundPolicy ===

impl From<OutboundPolicy> for pb::OutboundTrafficPolicy {
    fn from(policy: OutboundPolicy) -> Self {
        match policy {
            OutboundPolicy::AllowAny => Self::AllowAny,
            OutboundPolicy::RegistryOnly => Self::RegistryOnly,
        }
    }
}

impl OutboundPolicy {
    /// The policy a response carries. A value this proxy does not know (a newer control
    /// plane's) is read as `RegistryOnly`: refusing what it cannot place is the fail-closed
    /// reading of a policy it does not understand.
    pub fn from_wire(value: i32) -> Self {
        match pb::OutboundTrafficPolicy::try_from(value) {
            Ok(pb::OutboundTrafficPolicy::AllowAny) => Self::AllowAny,
            Ok(pb::OutboundTrafficPolicy::RegistryOnly) | Err(_) => Self::RegistryOnly,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn proto_service() -> pb::Service {
        pb::Service {
            namespace: "demo".into(),
            name: "web".into(),
            hostnames: vec!["web.example".into()],
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "http".into(),
                endpoints: vec![pb::Endpoint {
                    address: "10.0.0.1:4143".into(),
                    identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
                    workload: "web-1".into(),
                    labels: BTreeMap::from([("app".into(), "web".into())]),
                }],
            }],
            addresses: vec!["10.96.0.10".into(), "fd00::a".into()],
        }
    }

    #[test]
    fn valid_service_round_trips() {
        let proto = proto_service();
        let domain = Service::try_from(&proto);
        assert_eq!(domain.as_ref().map(pb::Service::from), Ok(proto));
    }

    #[test]
    fn invalid_services_are_refused_naming_service_and_field() {
        type Edit = fn(&mut pb::Service);
        let cases: &[(&str, Edit, &str)] = &[
            (
                "empty namespace",
                |s| s.namespace.clear(),
                "service /web: namespace is empty",
            ),
            (
                "empty name",
                |s| s.name.clear(),
                "service demo/: name is empty",
            ),
            (
                "port zero",
                |s| s.ports[0].port = 0,
                "service demo/web: ports[0].port = 0 is not a port (1..=65535)",
            ),
            (
                "port too large",
                |s| s.ports[0].port = 65_536,
                "service demo/web: ports[0].port = 65536 is not a port (1..=65535)",
            ),
            (
                "unknown protocol",
                |s| s.ports[0].protocol = "udp".into(),
                "service demo/web: ports[0].protocol = \"udp\" is not a protocol (\"http\" or \"tcp\")",
            ),
            (
                "address without port",
                |s| s.ports[0].endpoints[0].address = "10.0.0.1".into(),
                "service demo/web: ports[0].endpoints[0].address = \"10.0.0.1\" is not ip:port",
            ),
            (
                "service address not an IP",
                |s| s.addresses[1] = "x".into(),
                "service demo/web: addresses[1] = \"x\" is not an IP address",
            ),
            (
                "service address with a port",
                |s| s.addresses[0] = "10.96.0.10:80".into(),
                "service demo/web: addresses[0] = \"10.96.0.10:80\" is not an IP address",
            ),
            (
                "host name address",
                |s| s.ports[0].endpoints[0].address = "web:80".into(),
                "service demo/web: ports[0].endpoints[0].address = \"web:80\" is not ip:port",
            ),
        ];
        for (case, edit, want) in cases {
            let mut proto = proto_service();
            edit(&mut proto);
            let got = Service::try_from(&proto).map_err(|e| e.to_string());
            assert_eq!(got, Err((*want).to_owned()), "{case}");
        }
    }

    #[test]
    fn protocol_names_round_trip() {
        for p in [Protocol::Http, Protocol::Tcp] {
            assert_eq!(Protocol::from_name(p.as_str()), Some(p));
        }
        assert_eq!(Protocol::from_name("HTTP"), None);
    }

    #[test]
    fn service_key_parses_only_namespace_slash_name() {
        let cases = [
            ("demo/web", Some(ServiceKey::new("demo", "web"))),
            ("demo", None),
            ("/web", None),
            ("demo/", None),
            ("a/b/c", None),
        ];
        for (input, want) in cases {
            assert_eq!(ServiceKey::parse(input), want, "{input}");
        }
    }
}
