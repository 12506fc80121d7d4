//! Strict parsing of `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The grammar is deliberately narrower than the SPIFFE spec allows: Trellis identities
//! have exactly one shape, and every other spelling is refused rather than normalised,
//! so that two strings that compare unequal can never name the same workload.

use std::fmt;
use std::str::FromStr;

/// The trust domain used when none is configured, as in Kubernetes' cluster domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// SPIFFE caps a SPIFFE ID at 2048 bytes; we keep the same bound.
const MAX_LEN: usize = 2048;
/// DNS-1123 label length, the Kubernetes limit for namespace names.
const MAX_SEGMENT: usize = 253;

/// Why a string is not a Trellis SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The id is longer than 2048 bytes.
    #[error("spiffe id is longer than {MAX_LEN} bytes")]
    TooLong,
    /// The id does not start with the lowercase `spiffe://` scheme.
    #[error("spiffe id must start with `spiffe://`")]
    Scheme,
    /// The trust domain is empty or holds characters other than `a-z 0-9 . - _`.
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("spiffe id path must be /ns/<namespace>/sa/<service-account>, got {0:?}")]
    Path(String),
    /// A namespace or service account segment is not a lowercase DNS-1123 name.
    #[error("invalid {kind} {value:?}: use lowercase letters, digits, '-' and '.'")]
    Segment {
        /// Which segment (`namespace` or `service account`).
        kind: &'static str,
        /// The rejected value.
        value: String,
    },
}

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Construction always validates, so holding a `SpiffeId` means the string is canonical:
/// equality of ids is equality of their strings.
///
/// ```
/// use trellis_identity::SpiffeId;
/// let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
/// assert_eq!(id.namespace(), "demo");
/// assert!("spiffe://cluster.local/ns/demo/sa/../web".parse::<SpiffeId>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_end: usize,
    ns: (usize, usize),
    sa_start: usize,
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Builds an id from its parts, validating each.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// Parses an id, refusing anything that is not exactly the canonical form.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.len() > MAX_LEN {
            return Err(Error::TooLong);
        }
        // Case-sensitive on purpose: `SPIFFE://` is not silently folded.
        let rest = s.strip_prefix(SCHEME).ok_or(Error::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        let segs: Vec<&str> = path.split('/').collect();
        // "/ns/a/sa/b" splits into ["", "ns", "a", "sa", "b"].
        if segs.len() != 5 || !segs[0].is_empty() || segs[1] != "ns" || segs[3] != "sa" {
            return Err(Error::Path(path.to_owned()));
        }
        validate_segment("namespace", segs[2])?;
        validate_segment("service account", segs[4])?;
        let td_end = SCHEME.len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + segs[2].len();
        Ok(Self {
            uri: s.to_owned(),
            td_end,
            ns: (ns_start, ns_end),
            sa_start: ns_end + "/sa/".len(),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0..self.ns.1]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa_start..]
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// Checks a trust domain: lowercase letters, digits, `.`, `-`, `_` (SPIFFE's set), no
/// empty labels, no port, no userinfo.
pub(crate) fn validate_trust_domain(td: &str) -> Result<(), Error> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
        && !td.split('.').any(str::is_empty);
    if ok {
        Ok(())
    } else {
        Err(Error::TrustDomain(td.to_owned()))
    }
}

/// A namespace or service account: a lowercase RFC 1123 subdomain, which is what
/// Kubernetes allows for both. Excludes `.` and `..` as whole segments.
fn validate_segment(kind: &'static str, v: &str) -> Result<(), Error> {
    let bad = || Error::Segment {
        kind,
        value: v.to_owned(),
    };
    if v.is_empty() || v.len() > MAX_SEGMENT || v.split('.').any(str::is_empty) {
        return Err(bad());
    }
    let charset = v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if charset && ends(v.bytes().next()) && ends(v.bytes().last()) {
        Ok(())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_ids() {
        for s in [
            "spiffe://cluster.local/ns/demo/sa/web",
            "spiffe://cluster.local/ns/kube-system/sa/default",
            "spiffe://example.org/ns/a/sa/b",
            "spiffe://td_with_underscore/ns/a.b/sa/c-d",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
            assert_eq!(
                SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account()),
                Ok(id)
            );
        }
    }

    #[test]
    fn parts_are_split_exactly() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "web");
    }

    #[test]
    fn rejects_everything_else() {
        let long = format!("spiffe://cluster.local/ns/{}/sa/a", "a".repeat(MAX_LEN));
        for s in [
            "",
            "spiffe://",
            "SPIFFE://cluster.local/ns/demo/sa/web",
            "Spiffe://cluster.local/ns/demo/sa/web",
            "https://cluster.local/ns/demo/sa/web",
            "spiffe:/cluster.local/ns/demo/sa/web",
            "spiffe://Cluster.Local/ns/demo/sa/web",
            "spiffe://cluster.local:443/ns/demo/sa/web",
            "spiffe://user@cluster.local/ns/demo/sa/web",
            "spiffe://cluster..local/ns/demo/sa/web",
            "spiffe://.cluster.local/ns/demo/sa/web",
            "spiffe:///ns/demo/sa/web",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/demo/sa/web/",
            "spiffe://cluster.local/ns/demo/sa/web/extra",
            "spiffe://cluster.local/ns/demo/sa/",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local//ns/demo/sa/web",
            "spiffe://cluster.local/ns/demo/sa/../web",
            "spiffe://cluster.local/ns/../sa/web",
            "spiffe://cluster.local/ns/./sa/web",
            "spiffe://cluster.local/ns/demo/sa/..",
            "spiffe://cluster.local/ns/demo/sa/we%2Fb",
            "spiffe://cluster.local/ns/demo/sa/web?x=1",
            "spiffe://cluster.local/ns/demo/sa/web#frag",
            "spiffe://cluster.local/ns/Demo/sa/web",
            "spiffe://cluster.local/ns/demo/sa/WEB",
            "spiffe://cluster.local/ns/-demo/sa/web",
            "spiffe://cluster.local/ns/demo-/sa/web",
            "spiffe://cluster.local/ns/de_mo/sa/web",
            "spiffe://cluster.local/NS/demo/SA/web",
            "spiffe://cluster.local/sa/web/ns/demo",
            "spiffe://cluster.local/ns/demo/sa/web\0",
            "spiffe://cluster.local/ns/dé/sa/web",
            " spiffe://cluster.local/ns/demo/sa/web",
            "spiffe://cluster.local/ns/demo/sa/web ",
            long.as_str(),
        ] {
            assert!(SpiffeId::parse(s).is_err(), "accepted {s:?}");
        }
    }
}
