//! Checks on single parsed objects that serde cannot express: name syntax, port ranges,
//! duplicate ports, supported protocols, identities and addresses.
//!
//! Each check returns every [`FieldError`] it finds rather than the first, so one load
//! reports everything wrong with an object. Checks across objects (duplicates, shared
//! addresses, named target ports for pod-address workloads) need file locations and live
//! in `files`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};

use crate::objects::{
    HOSTNAMES_ANNOTATION, IntOrString, ObjectMeta, Service, ServiceSpec, Workload,
};

/// A problem with one field of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// Path of the field, e.g. `spec.ports[1].port`.
    pub(crate) field: String,
    /// What is wrong.
    pub(crate) message: String,
}

/// Longest DNS-1123 label.
const MAX_LABEL: usize = 63;
/// Longest DNS-1123 subdomain.
const MAX_SUBDOMAIN: usize = 253;

/// Checks a Service.
pub(crate) fn service(svc: &Service) -> Vec<FieldError> {
    let mut errors = Vec::new();
    metadata(&svc.metadata, &mut errors);
    let spec = &svc.spec;
    if let Some(t) = &spec.service_type {
        match t.as_str() {
            "ClusterIP" | "NodePort" | "LoadBalancer" => {}
            "ExternalName" => push(&mut errors, "spec.type", "ExternalName is not supported"),
            other => push(
                &mut errors,
                "spec.type",
                format!("unknown type {other:?}: expected ClusterIP, NodePort or LoadBalancer"),
            ),
        }
    }
    if let Some(ip) = &spec.cluster_ip
        && !(ip.is_empty() || ip == "None" || ip.parse::<IpAddr>().is_ok())
    {
        push(
            &mut errors,
            "spec.clusterIP",
            format!("invalid clusterIP {ip:?}: expected an IP address or \"None\""),
        );
    }
    cluster_ips(spec, &mut errors);
    // Where each port number and name was first seen, to name both sides of a duplicate.
    let mut numbers: BTreeMap<i32, usize> = BTreeMap::new();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        if !(1..=65535).contains(&port.port) {
            push(
                &mut errors,
                at("port"),
                format!("must be between 1 and 65535, got {}", port.port),
            );
        } else if let Some(first) = numbers.insert(port.port, i) {
            numbers.insert(port.port, first);
            push(
                &mut errors,
                at("port"),
                format!("duplicate port {} (also spec.ports[{first}])", port.port),
            );
        }
        if let Some(name) = &port.name {
            if let Err(why) = dns_label(name) {
                push(
                    &mut errors,
                    at("name"),
                    format!("invalid port name {name:?}: {why}"),
                );
            } else if let Some(first) = names.insert(name, i) {
                names.insert(name, first);
                push(
                    &mut errors,
                    at("name"),
                    format!("duplicate port name {name:?} (also spec.ports[{first}])"),
                );
            }
        }
        match &port.target_port {
            Some(IntOrString::Int(n)) if !(1..=65535).contains(n) => push(
                &mut errors,
                at("targetPort"),
                format!("must be between 1 and 65535, got {n}"),
            ),
            Some(IntOrString::String(name)) => {
                if let Err(why) = dns_label(name) {
                    push(
                        &mut errors,
                        at("targetPort"),
                        format!("invalid port name {name:?}: {why}"),
                    );
                }
            }
            _ => {}
        }
        match port.protocol.as_deref() {
            None | Some("TCP") => {}
            Some(p @ ("UDP" | "SCTP")) => push(
                &mut errors,
                at("protocol"),
                format!("protocol {p} is not supported: the mesh carries TCP only"),
            ),
            Some(other) => push(
                &mut errors,
                at("protocol"),
                format!("unknown protocol {other:?}: expected TCP"),
            ),
        }
    }
    if let Some(list) = svc.metadata.annotations.get(HOSTNAMES_ANNOTATION) {
        for host in split_hostnames(list) {
            if let Err(why) = dns_subdomain(host) {
                push(
                    &mut errors,
                    format!("metadata.annotations[{HOSTNAMES_ANNOTATION:?}]"),
                    format!("invalid host name {host:?}: {why}"),
                );
            }
        }
    }
    errors
}

/// Checks a Workload.
pub(crate) fn workload(w: &Workload) -> Vec<FieldError> {
    let mut errors = Vec::new();
    metadata(&w.metadata, &mut errors);
    // A fixed, valid namespace and trust domain isolate the service account from the
    // namespace (reported on its own above) and from the trust domain (chosen at run time).
    if let Err(e) = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", &w.spec.service_account) {
        push(
            &mut errors,
            "spec.serviceAccount",
            format!("does not make a valid identity: {e}"),
        );
    }
    match (w.spec.mesh_address, w.spec.address) {
        (Some(addr), None) => {
            if addr.ip().is_unspecified() || addr.port() == 0 {
                push(
                    &mut errors,
                    "spec.meshAddress",
                    format!(
                        "{addr} cannot be dialled: give a concrete IP address and a non-zero port"
                    ),
                );
            }
        }
        (None, Some(ip)) => {
            if ip.is_unspecified() {
                push(
                    &mut errors,
                    "spec.address",
                    format!("{ip} cannot be dialled: give the pod's own IP address"),
                );
            }
        }
        (mesh, _) => {
            let got = if mesh.is_some() { "both" } else { "neither" };
            push(
                &mut errors,
                "spec",
                format!(
                    "needs exactly one of meshAddress (ip:port where its proxy accepts mTLS) \
                     and address (the pod IP, for transparent capture); got {got}"
                ),
            );
        }
    }
    errors
}

/// Checks `spec.clusterIPs` on its own and against `spec.clusterIP`.
fn cluster_ips(spec: &ServiceSpec, errors: &mut Vec<FieldError>) {
    let ips = &spec.cluster_ips;
    // Kubernetes keeps `clusterIP` as a copy of `clusterIPs[0]`; objects exported from a
    // cluster carry both, so equal values are the normal case, not a duplicate.
    if let (Some(single), Some(first)) = (spec.cluster_ip.as_deref(), ips.first())
        && !single.is_empty()
        && !same_ip(single, first)
    {
        push(
            errors,
            "spec.clusterIPs[0]",
            format!("{first:?} must equal spec.clusterIP {single:?} when both are set"),
        );
    }
    // Where each address was first seen, to name both sides of a duplicate.
    let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (i, text) in ips.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if text == "None" {
            if ips.len() > 1 {
                push(errors, field, "\"None\" (headless) must be the only entry");
            }
            continue;
        }
        let Ok(ip) = text.parse::<IpAddr>() else {
            push(
                errors,
                field,
                format!("invalid clusterIP {text:?}: expected an IP address or \"None\""),
            );
            continue;
        };
        if let Some(first) = seen.insert(ip.to_canonical(), i) {
            seen.insert(ip.to_canonical(), first);
            push(
                errors,
                field,
                format!("duplicate address {ip} (also spec.clusterIPs[{first}])"),
            );
        }
    }
}

/// Whether two written addresses are the same: equal IPs however written, else equal text
/// (so `None` matches `None`).
fn same_ip(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
        _ => a == b,
    }
}

/// Splits the hostnames annotation: comma-separated, blanks ignored.
pub(crate) fn split_hostnames(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|h| !h.is_empty())
}

/// Checks a DNS-1123 label: 1-63 of `a-z 0-9 -`, starting and ending alphanumeric.
pub(crate) fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > MAX_LABEL {
        return Err(format!("must be at most {MAX_LABEL} characters"));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !s.chars().all(ok_char) || !edge(s.chars().next()) || !edge(s.chars().last()) {
        return Err(
            "use lowercase letters, digits and '-', starting and ending with a letter \
                    or digit (a DNS-1123 label)"
                .to_owned(),
        );
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > MAX_SUBDOMAIN {
        return Err(format!("must be at most {MAX_SUBDOMAIN} characters"));
    }
    s.split('.').try_for_each(dns_label)
}

fn metadata(meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
    if let Err(why) = dns_label(&meta.name) {
        push(
            errors,
            "metadata.name",
            format!("invalid name {:?}: {why}", meta.name),
        );
    }
    if let Err(why) = dns_label(&meta.namespace) {
        push(
            errors,
            "metadata.namespace",
            format!("invalid namespace {:?}: {why}", meta.namespace),
        );
    }
}

fn push(errors: &mut Vec<FieldError>, field: impl Into<String>, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.into(),
        message: message.into(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{ServicePort, WorkloadSpec};

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: "demo".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    fn port(name: Option<&str>, port: i32) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            port,
            target_port: None,
            protocol: None,
            app_protocol: None,
        }
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn dns_labels_follow_rfc_1123() {
        for ok in ["a", "web", "web-1", "1web", &"a".repeat(63)] {
            assert_eq!(dns_label(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Web", "web_1", "-web", "web-", "a.b", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_reports_every_port_problem_with_its_path() {
        let mut svc = Service {
            metadata: meta("web"),
            spec: ServiceSpec {
                ports: vec![
                    port(Some("http"), 80),
                    port(Some("http"), 0),
                    port(Some("admin"), 80),
                    port(Some("Bad_Name"), 70000),
                ],
                ..ServiceSpec::default()
            },
        };
        svc.spec.ports[2].protocol = Some("UDP".into());
        svc.spec.ports[2].target_port = Some(IntOrString::Int(0));
        let errors = service(&svc);
        assert_eq!(
            fields(&errors),
            [
                "spec.ports[1].port",
                "spec.ports[1].name",
                "spec.ports[2].port",
                "spec.ports[2].targetPort",
                "spec.ports[2].protocol",
                "spec.ports[3].port",
                "spec.ports[3].name",
            ],
            "{errors:#?}"
        );
        assert_eq!(errors[2].message, "duplicate port 80 (also spec.ports[0])");
        assert_eq!(
            errors[4].message,
            "protocol UDP is not supported: the mesh carries TCP only"
        );
    }

    #[test]
    fn service_checks_type_cluster_ip_and_hostnames() {
        let mut svc = Service {
            metadata: meta("web"),
            spec: ServiceSpec {
                service_type: Some("ExternalName".into()),
                cluster_ip: Some("10.0.0.300".into()),
                ..ServiceSpec::default()
            },
        };
        svc.metadata
            .annotations
            .insert(HOSTNAMES_ANNOTATION.into(), "web.example, ,Bad_Host".into());
        let errors = service(&svc);
        assert_eq!(
            fields(&errors),
            [
                "spec.type",
                "spec.clusterIP",
                "metadata.annotations[\"trellis.dev/hostnames\"]"
            ]
        );
        assert!(
            errors[2].message.contains("\"Bad_Host\""),
            "{}",
            errors[2].message
        );
    }

    #[test]
    fn cluster_ips_must_be_unique_ips_led_by_cluster_ip() {
        let spec = |cluster_ip: Option<&str>, ips: &[&str]| Service {
            metadata: meta("web"),
            spec: ServiceSpec {
                cluster_ip: cluster_ip.map(Into::into),
                cluster_ips: ips.iter().map(|ip| (*ip).to_owned()).collect(),
                ..ServiceSpec::default()
            },
        };
        /// Case, `clusterIP`, `clusterIPs`, expected `(field, message)`s.
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a [&'a str],
            &'a [(&'a str, &'a str)],
        );
        let cases: &[Case<'_>] = &[
            ("single", None, &["10.96.0.10"], &[]),
            (
                "dual stack as exported",
                Some("10.96.0.10"),
                &["10.96.0.10", "fd00::10"],
                &[],
            ),
            (
                "ipv6 written differently",
                Some("fd00::a"),
                &["fd00:0::a"],
                &[],
            ),
            ("headless", Some("None"), &["None"], &[]),
            ("empty clusterIP", Some(""), &["10.96.0.10"], &[]),
            (
                "not an ip",
                None,
                &["10.96.0.10", "x"],
                &[(
                    "spec.clusterIPs[1]",
                    "invalid clusterIP \"x\": expected an IP address or \"None\"",
                )],
            ),
            (
                "duplicate",
                None,
                &["10.96.0.10", "fd00::10", "10.96.0.10"],
                &[(
                    "spec.clusterIPs[2]",
                    "duplicate address 10.96.0.10 (also spec.clusterIPs[0])",
                )],
            ),
            (
                "ipv4-mapped duplicate",
                None,
                &["10.96.0.10", "::ffff:10.96.0.10"],
                &[(
                    "spec.clusterIPs[1]",
                    "duplicate address ::ffff:10.96.0.10 (also spec.clusterIPs[0])",
                )],
            ),
            (
                "none among addresses",
                None,
                &["None", "10.96.0.10"],
                &[(
                    "spec.clusterIPs[0]",
                    "\"None\" (headless) must be the only entry",
                )],
            ),
            (
                "clusterIP is not the first",
                Some("10.96.0.10"),
                &["fd00::10", "10.96.0.10"],
                &[(
                    "spec.clusterIPs[0]",
                    "\"fd00::10\" must equal spec.clusterIP \"10.96.0.10\" when both are set",
                )],
            ),
        ];
        for (case, cluster_ip, ips, want) in cases {
            let got: Vec<(String, String)> = service(&spec(*cluster_ip, ips))
                .into_iter()
                .map(|e| (e.field, e.message))
                .collect();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(f, m)| ((*f).to_owned(), (*m).to_owned()))
                .collect();
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn workload_needs_exactly_one_dialable_address() {
        let w = |mesh: Option<&str>, address: Option<&str>| Workload {
            metadata: meta("web-1"),
            spec: WorkloadSpec {
                service_account: "web".into(),
                mesh_address: mesh.map(|a| a.parse().unwrap()),
                address: address.map(|a| a.parse().unwrap()),
            },
        };
        let exactly_one = |got: &str| {
            format!(
                "needs exactly one of meshAddress (ip:port where its proxy accepts mTLS) and \
                 address (the pod IP, for transparent capture); got {got}"
            )
        };
        let cases = [
            ("mesh address", w(Some("127.0.0.1:16011"), None), vec![]),
            ("pod ipv4", w(None, Some("10.244.0.12")), vec![]),
            ("pod ipv6", w(None, Some("fd00:10:244::12")), vec![]),
            (
                "neither",
                w(None, None),
                vec![("spec", exactly_one("neither"))],
            ),
            (
                "both",
                w(Some("127.0.0.1:16011"), Some("10.244.0.12")),
                vec![("spec", exactly_one("both"))],
            ),
            (
                "unspecified pod address",
                w(None, Some("::")),
                vec![(
                    "spec.address",
                    ":: cannot be dialled: give the pod's own IP address".to_owned(),
                )],
            ),
        ];
        for (case, w, want) in cases {
            let got: Vec<(String, String)> = workload(&w)
                .into_iter()
                .map(|e| (e.field, e.message))
                .collect();
            let want: Vec<(String, String)> =
                want.into_iter().map(|(f, m)| (f.to_owned(), m)).collect();
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn workload_needs_a_valid_identity_and_a_dialable_address() {
        let w = Workload {
            metadata: ObjectMeta {
                namespace: "Demo".into(),
                ..meta("web-1")
            },
            spec: WorkloadSpec {
                service_account: "Web".into(),
                mesh_address: Some("0.0.0.0:16011".parse().unwrap()),
                address: None,
            },
        };
        let errors = workload(&w);
        assert_eq!(
            fields(&errors),
            [
                "metadata.namespace",
                "spec.serviceAccount",
                "spec.meshAddress"
            ]
        );
        assert!(
            errors[1].message.contains("\"Web\""),
            "{}",
            errors[1].message
        );
    }
}
