//! Large responses in parts: [`split`] on the control plane, [`Parts`] on the proxy.
//!
//! gRPC libraries encode and decode each message into a per-stream buffer that keeps the
//! capacity of the largest message it has held, for as long as the stream lives. A full
//! view of a mesh with 10,000 endpoints is about a megabyte, so one message per view would
//! pin a megabyte per proxy on both ends (a gigabyte on a control plane serving 1,000
//! proxies). Splitting keeps every message near [`DEFAULT_PART_BYTES`] whatever the size of
//! the mesh; see `more` in `proto/discovery.proto` for the contract.

use prost::Message;

use crate::discovery::v1 as pb;

/// Target encoded size of one part. Small enough that per-stream buffers stay small,
/// large enough that a typical change is one message.
pub const DEFAULT_PART_BYTES: usize = 16 * 1024;

/// Largest version [`Parts`] reassembles: a control plane that sends more is broken, and
/// the proxy refuses the version rather than grow without bound.
pub const MAX_ASSEMBLED_BYTES: usize = 256 * 1024 * 1024;

/// Splits `resp` into parts of about `max_bytes` each (a single service larger than that
/// goes alone in its part). A response that fits is returned as it is, alone.
///
/// The first part keeps everything but the upserts and removals that overflow it; every
/// later part has the same version, `full = false`, and only upserts and removals. All
/// but the last have `more = true`.
pub fn split(mut resp: pb::DiscoveryResponse, max_bytes: usize) -> Vec<pb::DiscoveryResponse> {
    if resp.encoded_len() <= max_bytes {
        return vec![resp];
    }
    let upserts = std::mem::take(&mut resp.upserts);
    let removed = std::mem::take(&mut resp.removed);
    let mut parts = Vec::new();
    let mut current = resp.clone();
    let mut size = current.encoded_len();
    let mut push = |current: &mut pb::DiscoveryResponse, size: &mut usize, item_len: usize| {
        if *size + item_len > max_bytes
            && !(current.upserts.is_empty() && current.removed.is_empty())
        {
            let next = pb::DiscoveryResponse {
                version: resp.version,
                ..Default::default()
            };
            parts.push(std::mem::replace(current, next));
            *size = current.encoded_len();
        }
        *size += item_len;
    };
    for svc in upserts {
        // Tag, length prefix and the message: an upper bound of its share of the part.
        let len = svc.encoded_len() + 11;
        push(&mut current, &mut size, len);
        current.upserts.push(svc);
    }
    for key in removed {
        let len = key.len() + 11;
        push(&mut current, &mut size, len);
        current.removed.push(key);
    }
    parts.push(current);
    let last = parts.len() - 1;
    for part in &mut parts[..last] {
        part.more = true;
    }
    parts
}

/// Collects the parts of a version until the last one arrives.
#[derive(Debug, Default)]
pub struct Parts {
    pending: Option<pb::DiscoveryResponse>,
    bytes: usize,
}

/// A part that does not continue the version being assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    /// A part of another version arrived before the last part of this one.
    #[error("part of v{got} arrived while v{assembling} was incomplete")]
    VersionChanged {
        /// The version being assembled.
        assembling: u64,
        /// The version of the part that arrived.
        got: u64,
    },
    /// A later part claims to be a full view, which only the first part may.
    #[error("a later part of v{version} is marked full")]
    FullInLaterPart {
        /// The version being assembled.
        version: u64,
    },
    /// The parts of one version add up to more than [`MAX_ASSEMBLED_BYTES`].
    #[error("v{version} is larger than {MAX_ASSEMBLED_BYTES} bytes")]
    TooLarge {
        /// The version being assembled.
        version: u64,
    },
}

impl Parts {
    /// Adds a received response. `Ok(Some(whole))` when `resp` completes a version (or
    /// was never split), `Ok(None)` while more parts are due. On error the version being
    /// assembled is dropped, and the caller refuses it.
    pub fn push(
        &mut self,
        resp: pb::DiscoveryResponse,
    ) -> Result<Option<pb::DiscoveryResponse>, PartsError> {
        let more = resp.more;
        let whole = match self.pending.take() {
            None => {
                self.bytes = resp.encoded_len();
                resp
            }
            Some(mut pending) => {
                if resp.version != pending.version {
                    return Err(PartsError::VersionChanged {
                        assembling: pending.version,
                        got: resp.version,
                    });
                }
                if resp.full {
                    return Err(PartsError::FullInLaterPart {
                        version: pending.version,
                    });
                }
                self.bytes += resp.encoded_len();
                pending.upserts.extend(resp.upserts);
                pending.removed.extend(resp.removed);
                pending
            }
        };
        if self.bytes > MAX_ASSEMBLED_BYTES {
            return Err(PartsError::TooLarge {
                version: whole.version,
            });
        }
        if more {
            self.pending = Some(whole);
            return Ok(None);
        }
        Ok(Some(pb::DiscoveryResponse {
            more: false,
            ..whole
        }))
    }

    /// True while a version is partly received.
    pub fn is_assembling(&self) -> bool {
        self.pending.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, endpoints: usize) -> pb::Service {
        pb::Service {
            namespace: "demo".into(),
            name: name.into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "http".into(),
                endpoints: (0..endpoints)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.{}.{}:8080", i / 250, i % 250),
                        identity: format!("spiffe://cluster.local/ns/demo/sa/{name}"),
                        workload: format!("{name}-{i}"),
                        labels: Default::default(),
                    })
                    .collect(),
            }],
            ..Default::default()
        }
    }

    fn big() -> pb::DiscoveryResponse {
        pb::DiscoveryResponse {
            version: 9,
            full: true,
            upserts: (0..200).map(|i| service(&format!("svc-{i}"), 10)).collect(),
            removed: (0..50).map(|i| format!("demo/gone-{i}")).collect(),
            trust_domain: "cluster.local".into(),
            trust_roots_der: vec![vec![7; 600]],
            ca_generation: 3,
            more: false,
            outbound_traffic_policy: 1,
            access_log: 2,
            tracing: None,
            authorization: None,
            routes: None,
        }
    }

    #[test]
    fn split_then_reassembled_is_the_original() -> Result<(), PartsError> {
        let original = big();
        let parts = split(original.clone(), 8 * 1024);
        assert!(parts.len() > 10, "{} parts", parts.len());
        for (i, part) in parts.iter().enumerate() {
            assert!(
                part.encoded_len() <= 8 * 1024,
                "part {i}: {}",
                part.encoded_len()
            );
            assert_eq!(part.more, i + 1 < parts.len());
            assert_eq!(part.version, 9);
            assert_eq!(part.full, i == 0);
            assert_eq!(part.trust_roots_der.is_empty(), i != 0);
        }
        let mut assembler = Parts::default();
        let mut whole = None;
        for part in parts {
            assert!(whole.is_none(), "completed before the last part");
            whole = assembler.push(part)?;
        }
        assert_eq!(whole, Some(original));
        assert!(!assembler.is_assembling());
        Ok(())
    }

    #[test]
    fn small_responses_and_oversized_services_stay_whole() {
        let small = pb::DiscoveryResponse {
            version: 2,
            upserts: vec![service("web", 1)],
            ..Default::default()
        };
        assert_eq!(split(small.clone(), 64 * 1024), vec![small]);
        // One service larger than a part still goes out, alone in its part.
        let huge = pb::DiscoveryResponse {
            version: 3,
            upserts: vec![service("a", 2000), service("b", 2000)],
            ..Default::default()
        };
        let parts = split(huge, 1024);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.upserts.len() == 1));
    }

    #[test]
    fn broken_sequences_are_refused() {
        let parts = split(big(), 8 * 1024);
        let mut assembler = Parts::default();
        assert_eq!(assembler.push(parts[0].clone()), Ok(None));
        let other = pb::DiscoveryResponse {
            version: 10,
            ..parts[1].clone()
        };
        assert_eq!(
            assembler.push(other),
            Err(PartsError::VersionChanged {
                assembling: 9,
                got: 10
            })
        );
        assert!(!assembler.is_assembling());
        assert_eq!(assembler.push(parts[0].clone()), Ok(None));
        assert_eq!(
            assembler.push(parts[0].clone()),
            Err(PartsError::FullInLaterPart { version: 9 })
        );
    }
}
