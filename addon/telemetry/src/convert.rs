//! OTLP `ResourceSpans` → the SDK's `SpanData`, the input of every `SpanExporter`.
//!
//! Two things here are not a plain field-by-field copy:
//!
//! - **Identity.** With a verified caller, the resource's namespace attributes are replaced
//!   by the namespace of its SPIFFE id and `trellis.identity` is set to the id, so a proxy
//!   cannot report telemetry as another namespace. Attributes named `ai.*` are dropped
//!   everywhere: the Application Insights exporter copies them verbatim into envelope tags,
//!   which would let a proxy set `ai.cloud.role` to anything.
//! - **Per-span resource.** One exporter serves every proxy, so the exporter-wide resource
//!   cannot describe a span's workload. The exporter also reads cloud role and role instance
//!   from each span's instrumentation scope attributes, so every span gets a scope named
//!   [`SCOPE_NAME`] carrying its resource's attributes. The same attributes are appended to
//!   the span's own attributes, which become the envelope's `properties` (customDimensions)
//!   — what the exporter does with its own resource — or `trellis.identity` would be
//!   visible nowhere in Application Insights.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, Key, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as ProtoKeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::{Span as ProtoSpan, span, status};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use trellis_identity::SpiffeId;

/// Resource attributes kept per `ResourceSpans` (the first ones after de-duplication),
/// besides the ones the gateway sets: each is copied into every span of the resource.
pub const MAX_RESOURCE_ATTRIBUTES: usize = 32;
/// The instrumentation scope name every converted span carries.
pub const SCOPE_NAME: &str = "trellis-proxy";
/// Resource attribute the gateway sets to the caller's SPIFFE id (and removes when a caller
/// reports it).
pub const IDENTITY_ATTRIBUTE: &str = "trellis.identity";

const SERVICE_NAME: &str = "service.name";
const SERVICE_NAMESPACE: &str = "service.namespace";
const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
/// The SDKs' fallback service name; the exporter then takes the cloud role from workload
/// attributes (`k8s.deployment.name`, ...) WITHOUT the namespace, so it is replaced too.
const UNKNOWN_SERVICE: &str = "unknown_service";

/// `Span.flags` bits 8 and 9: whether the parent's remoteness is known, and if so, whether
/// the parent is remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// The spans of one request, converted, and what was refused.
#[derive(Debug, Default)]
pub(crate) struct Converted {
    pub(crate) spans: Vec<SpanData>,
    /// Spans refused as malformed.
    pub(crate) invalid: u64,
    /// Why the first refused span was refused, for the caller's partial-success message.
    pub(crate) first_error: Option<String>,
}

/// How many spans `request` holds.
pub(crate) fn span_count(request: &ExportTraceServiceRequest) -> usize {
    request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

/// Converts every span of `request`; `peer` is the verified caller, if any.
pub(crate) fn convert_request(
    request: ExportTraceServiceRequest,
    peer: Option<&SpiffeId>,
) -> Converted {
    let mut out = Converted::default();
    for resource_spans in request.resource_spans {
        let resource = resource_attributes(resource_spans.resource, peer);
        for scope_spans in resource_spans.scope_spans {
            let mut scope = InstrumentationScope::builder(SCOPE_NAME);
            if let Some(version) = scope_spans.scope.map(|s| s.version)
                && !version.is_empty()
            {
                scope = scope.with_version(version);
            }
            let scope = scope.with_attributes(resource.iter().cloned()).build();
            for proto_span in scope_spans.spans {
                match convert_span(proto_span, &scope, &resource) {
                    Ok(span) => out.spans.push(span),
                    Err(why) => {
                        out.invalid += 1;
                        out.first_error.get_or_insert(why);
                    }
                }
            }
        }
    }
    out
}

/// The resource's attributes after the identity rule (see the module docs), at most
/// [`MAX_RESOURCE_ATTRIBUTES`] of the caller's plus the ones the gateway sets.
pub(crate) fn resource_attributes(
    resource: Option<ProtoResource>,
    peer: Option<&SpiffeId>,
) -> Vec<KeyValue> {
    let reported = key_values(resource.map(|r| r.attributes).unwrap_or_default())
        .filter(|kv| kv.key.as_str() != IDENTITY_ATTRIBUTE);
    // Deduplicated before the rule is applied, so the value checked is the value kept.
    let mut attrs = dedup_last_wins(reported.collect());
    attrs.truncate(MAX_RESOURCE_ATTRIBUTES);
    if let Some(peer) = peer {
        attrs.retain(|kv| !matches!(kv.key.as_str(), SERVICE_NAMESPACE | K8S_NAMESPACE_NAME));
        let named = attrs.iter().any(|kv| {
            kv.key.as_str() == SERVICE_NAME && {
                let name = kv.value.as_str();
                !name.is_empty() && !name.starts_with(UNKNOWN_SERVICE)
            }
        });
        if !named {
            // The cloud role is `<service.namespace>.<service.name>`; without a usable name
            // the service account stands in, so the role still carries the caller's namespace.
            attrs.retain(|kv| kv.key.as_str() != SERVICE_NAME);
            attrs.push(KeyValue::new(
                SERVICE_NAME,
                peer.service_account().to_owned(),
            ));
        }
        attrs.push(KeyValue::new(
            SERVICE_NAMESPACE,
            peer.namespace().to_owned(),
        ));
        attrs.push(KeyValue::new(
            K8S_NAMESPACE_NAME,
            peer.namespace().to_owned(),
        ));
        attrs.push(KeyValue::new(IDENTITY_ATTRIBUTE, peer.as_str().to_owned()));
    }
    attrs.into_iter().map(shared).collect()
}

/// Keeps the last value of each key (OTLP does not forbid repeated keys; a map keeps the
/// last one too), in the order of those last values. Linear: a resource can be large.
fn dedup_last_wins(attrs: Vec<KeyValue>) -> Vec<KeyValue> {
    let mut seen = HashSet::with_capacity(attrs.len());
    let mut out: Vec<KeyValue> = attrs
        .into_iter()
        .rev()
        .filter(|kv| seen.insert(kv.key.clone()))
        .collect();
    out.reverse();
    out
}

/// The same attribute with reference-counted strings: every span of the resource carries
/// a copy (twice), which then costs a counter increment, not an allocation. Arrays become
/// their display string, which is all Application Insights shows of them anyway.
fn shared(kv: KeyValue) -> KeyValue {
    let key = Key::from(Arc::<str>::from(kv.key.as_str()));
    let value = match kv.value {
        value @ (Value::Bool(_) | Value::I64(_) | Value::F64(_)) => value,
        other => Value::from(Arc::<str>::from(other.as_str().as_ref())),
    };
    KeyValue::new(key, value)
}

fn convert_span(
    s: ProtoSpan,
    scope: &InstrumentationScope,
    resource: &[KeyValue],
) -> Result<SpanData, String> {
    let trace_id = parse_trace_id(&s.trace_id).ok_or_else(|| {
        format!(
            "trace_id must be 16 bytes, not all zero (got {} bytes)",
            s.trace_id.len()
        )
    })?;
    let span_id = parse_span_id(&s.span_id).ok_or_else(|| {
        format!(
            "span_id must be 8 bytes, not all zero (got {} bytes)",
            s.span_id.len()
        )
    })?;
    let parent_span_id = match s.parent_span_id.len() {
        0 => SpanId::INVALID,
        // All zero means "no parent" as an empty field does.
        _ => parse_span_id(&s.parent_span_id)
            .or_else(|| {
                s.parent_span_id
                    .iter()
                    .all(|&b| b == 0)
                    .then_some(SpanId::INVALID)
            })
            .ok_or_else(|| {
                format!(
                    "parent_span_id must be empty or 8 bytes (got {} bytes)",
                    s.parent_span_id.len()
                )
            })?,
    };
    if s.start_time_unix_nano == 0 {
        // Application Insights would file it under 1970 and drop it silently.
        return Err("start_time_unix_nano is 0".to_owned());
    }
    let start_time = unix_nanos(s.start_time_unix_nano);
    // An end before the start is kept: the exporter reports a zero duration for it.
    let end_time = unix_nanos(s.end_time_unix_nano);
    let trace_state = s.trace_state.parse::<TraceState>().unwrap_or_default();
    let flags = TraceFlags::new(u8::try_from(s.flags & 0xff).unwrap_or_default());

    // Span attributes, then the resource's: on a clash the resource wins, as it does in the
    // exporter's own properties, so a span cannot restate its namespace or identity.
    let mut attributes: Vec<KeyValue> = key_values(s.attributes)
        .filter(|kv| resource.iter().all(|r| r.key != kv.key))
        .collect();
    attributes.extend(resource.iter().cloned());

    let events = s
        .events
        .into_iter()
        .map(|e| {
            Event::new(
                e.name,
                unix_nanos(e.time_unix_nano),
                all_key_values(e.attributes).collect(),
                e.dropped_attributes_count,
            )
        })
        .collect();
    // Both are #[non_exhaustive]: built from Default.
    let mut links = SpanLinks::default();
    links.dropped_count = s.dropped_links_count;
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    span_events.dropped_count = s.dropped_events_count;
    for link in s.links {
        // A malformed link does not spoil the span: it is counted as dropped.
        let (Some(link_trace), Some(link_span)) =
            (parse_trace_id(&link.trace_id), parse_span_id(&link.span_id))
        else {
            links.dropped_count = links.dropped_count.saturating_add(1);
            continue;
        };
        let context = SpanContext::new(
            link_trace,
            link_span,
            TraceFlags::new(u8::try_from(link.flags & 0xff).unwrap_or_default()),
            true,
            link.trace_state.parse().unwrap_or_default(),
        );
        links.links.push(Link::new(
            context,
            all_key_values(link.attributes).collect(),
            link.dropped_attributes_count,
        ));
    }

    Ok(SpanData {
        span_context: SpanContext::new(trace_id, span_id, flags, false, trace_state),
        parent_span_id,
        parent_span_is_remote: s.flags & FLAG_HAS_IS_REMOTE != 0 && s.flags & FLAG_IS_REMOTE != 0,
        span_kind: span_kind(s.kind),
        name: Cow::Owned(s.name),
        start_time,
        end_time,
        attributes,
        dropped_attributes_count: s.dropped_attributes_count,
        events: span_events,
        links,
        status: span_status(s.status),
        instrumentation_scope: scope.clone(),
    })
}

fn parse_trace_id(bytes: &[u8]) -> Option<TraceId> {
    let id = <[u8; 16]>::try_from(bytes).ok()?;
    (id != [0; 16]).then(|| TraceId::from_bytes(id))
}

fn parse_span_id(bytes: &[u8]) -> Option<SpanId> {
    let id = <[u8; 8]>::try_from(bytes).ok()?;
    (id != [0; 8]).then(|| SpanId::from_bytes(id))
}

fn unix_nanos(nanos: u64) -> SystemTime {
    // Cannot overflow for any u64 on the platforms we build for; the fallback is for form.
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_nanos(nanos))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn span_kind(kind: i32) -> SpanKind {
    match span::SpanKind::try_from(kind) {
        Ok(span::SpanKind::Server) => SpanKind::Server,
        Ok(span::SpanKind::Client) => SpanKind::Client,
        Ok(span::SpanKind::Producer) => SpanKind::Producer,
        Ok(span::SpanKind::Consumer) => SpanKind::Consumer,
        // The spec reads UNSPECIFIED (and anything unknown) as INTERNAL.
        _ => SpanKind::Internal,
    }
}

fn span_status(status: Option<opentelemetry_proto::tonic::trace::v1::Status>) -> Status {
    let Some(status) = status else {
        return Status::Unset;
    };
    match status::StatusCode::try_from(status.code) {
        Ok(status::StatusCode::Ok) => Status::Ok,
        Ok(status::StatusCode::Error) => Status::error(status.message),
        _ => Status::Unset,
    }
}

/// Span and resource attributes: [`all_key_values`] without `ai.*` keys, which the exporter
/// would turn into envelope tags.
pub(crate) fn key_values(kvs: Vec<ProtoKeyValue>) -> impl Iterator<Item = KeyValue> {
    all_key_values(kvs).filter(|kv| !kv.key.as_str().starts_with("ai."))
}

/// Attributes with a value; a missing value (or a profiles-only string-table index) has
/// nothing to show.
fn all_key_values(kvs: Vec<ProtoKeyValue>) -> impl Iterator<Item = KeyValue> {
    kvs.into_iter()
        .filter_map(|kv| Some(KeyValue::new(kv.key, value(kv.value?)?)))
}

fn value(v: AnyValue) -> Option<Value> {
    Some(match v.value? {
        any_value::Value::StringValue(s) => Value::from(s),
        any_value::Value::BoolValue(b) => Value::Bool(b),
        any_value::Value::IntValue(i) => Value::I64(i),
        any_value::Value::DoubleValue(d) => Value::F64(d),
        any_value::Value::ArrayValue(array) => array_value(array.values),
        // The SDK has no maps or bytes; Application Insights shows every value as a string.
        other @ (any_value::Value::KvlistValue(_) | any_value::Value::BytesValue(_)) => {
            Value::from(render(&other))
        }
        any_value::Value::StringValueStrindex(_) => return None,
    })
}

/// A homogeneous array of scalars stays an array; anything else is rendered to a string.
fn array_value(values: Vec<AnyValue>) -> Value {
    use any_value::Value as V;
    let scalars: Vec<V> = values.iter().filter_map(|v| v.value.clone()).collect();
    // Every element through `pick`, or `None` as soon as one is of another type.
    fn each<T>(scalars: &[V], pick: impl Fn(&V) -> Option<T>) -> Option<Vec<T>> {
        scalars.iter().map(pick).collect()
    }
    let array = each(&scalars, |v| match v {
        V::StringValue(s) => Some(StringValue::from(s.clone())),
        _ => None,
    })
    .map(Array::String)
    .or_else(|| {
        each(&scalars, |v| match v {
            V::BoolValue(b) => Some(*b),
            _ => None,
        })
        .map(Array::Bool)
    })
    .or_else(|| {
        each(&scalars, |v| match v {
            V::IntValue(i) => Some(*i),
            _ => None,
        })
        .map(Array::I64)
    })
    .or_else(|| {
        each(&scalars, |v| match v {
            V::DoubleValue(d) => Some(*d),
            _ => None,
        })
        .map(Array::F64)
    });
    match array {
        Some(array) if scalars.len() == values.len() => Value::Array(array),
        _ => Value::from(render(&V::ArrayValue(
            opentelemetry_proto::tonic::common::v1::ArrayValue { values },
        ))),
    }
}

/// `[a,b]`, `{k:v,...}` and lowercase hex for bytes: the exporter's own rendering of
/// structured log values.
fn render(value: &any_value::Value) -> String {
    use any_value::Value as V;
    use std::fmt::Write as _;
    let render_any = |v: &AnyValue| v.value.as_ref().map(render).unwrap_or_default();
    match value {
        V::StringValue(s) => s.clone(),
        V::BoolValue(b) => b.to_string(),
        V::IntValue(i) => i.to_string(),
        V::DoubleValue(d) => d.to_string(),
        V::ArrayValue(a) => {
            let items: Vec<String> = a.values.iter().map(render_any).collect();
            format!("[{}]", items.join(","))
        }
        V::KvlistValue(kvs) => {
            let items: Vec<String> = kvs
                .values
                .iter()
                .map(|kv| {
                    format!(
                        "{}:{}",
                        kv.key,
                        kv.value.as_ref().map(render_any).unwrap_or_default()
                    )
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
        V::BytesValue(bytes) => bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        }),
        V::StringValueStrindex(i) => i.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, InstrumentationScope, KeyValueList};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status as ProtoStatus};

    use super::*;

    fn kv(key: &str, value: any_value::Value) -> ProtoKeyValue {
        ProtoKeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.to_owned())
    }

    fn good_span() -> ProtoSpan {
        ProtoSpan {
            trace_id: vec![0xab; 16],
            span_id: vec![0xcd; 8],
            name: "GET".to_owned(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_250_000_000,
            ..Default::default()
        }
    }

    fn request(resource: Vec<ProtoKeyValue>, spans: Vec<ProtoSpan>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(ProtoResource {
                    attributes: resource,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "proxy-internal".to_owned(),
                        version: "1.2.3".to_owned(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn attr<'a>(attrs: impl IntoIterator<Item = &'a KeyValue>, key: &str) -> Option<String> {
        attrs
            .into_iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    }

    #[test]
    fn fields_ids_times_kind_and_status_are_carried_over() {
        let mut span = good_span();
        span.parent_span_id = vec![1, 2, 3, 4, 5, 6, 7, 8];
        span.flags = 0x301;
        span.trace_state = "vendor=x".to_owned();
        span.status = Some(ProtoStatus {
            code: status::StatusCode::Error as i32,
            message: "upstream 503".to_owned(),
        });
        span.dropped_attributes_count = 4;
        let out = convert_request(request(vec![], vec![span]), None);
        assert_eq!(out.invalid, 0);
        let [span] = &out.spans[..] else {
            panic!("{:?}", out.spans)
        };
        assert_eq!(
            span.span_context.trace_id().to_string(),
            "abababababababababababababababab"
        );
        assert_eq!(span.span_context.span_id().to_string(), "cdcdcdcdcdcdcdcd");
        assert_eq!(span.parent_span_id.to_string(), "0102030405060708");
        assert!(span.parent_span_is_remote);
        assert!(span.span_context.is_sampled());
        assert_eq!(span.span_context.trace_state().header(), "vendor=x");
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.name, "GET");
        assert_eq!(
            span.end_time.duration_since(span.start_time).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            span.start_time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(span.status, Status::error("upstream 503"));
        assert_eq!(span.dropped_attributes_count, 4);
        assert_eq!(span.instrumentation_scope.name(), SCOPE_NAME);
        assert_eq!(span.instrumentation_scope.version(), Some("1.2.3"));
    }

    #[test]
    fn kinds_and_statuses_map_like_the_spec_says() {
        for (kind, expected) in [
            (0, SpanKind::Internal),
            (1, SpanKind::Internal),
            (2, SpanKind::Server),
            (3, SpanKind::Client),
            (4, SpanKind::Producer),
            (5, SpanKind::Consumer),
            (99, SpanKind::Internal),
        ] {
            assert_eq!(span_kind(kind), expected, "kind {kind}");
        }
        assert_eq!(span_status(None), Status::Unset);
        for (code, expected) in [(0, Status::Unset), (1, Status::Ok), (7, Status::Unset)] {
            let status = ProtoStatus {
                code,
                message: String::new(),
            };
            assert_eq!(span_status(Some(status)), expected, "code {code}");
        }
    }

    #[test]
    fn attribute_values_of_every_type() {
        let mut span = good_span();
        span.attributes = vec![
            kv("str", s("x")),
            kv("int", any_value::Value::IntValue(503)),
            kv("bool", any_value::Value::BoolValue(true)),
            kv("double", any_value::Value::DoubleValue(0.5)),
            kv(
                "ints",
                any_value::Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(any_value::Value::IntValue(1)),
                        },
                        AnyValue {
                            value: Some(any_value::Value::IntValue(2)),
                        },
                    ],
                }),
            ),
            kv(
                "mixed",
                any_value::Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(s("a")),
                        },
                        AnyValue {
                            value: Some(any_value::Value::IntValue(2)),
                        },
                    ],
                }),
            ),
            kv(
                "map",
                any_value::Value::KvlistValue(KeyValueList {
                    values: vec![kv("k", s("v"))],
                }),
            ),
            kv("bytes", any_value::Value::BytesValue(vec![0xde, 0xad])),
            ProtoKeyValue {
                key: "no-value".to_owned(),
                value: None,
                ..Default::default()
            },
            kv("ai.cloud.role", s("someone-else")),
        ];
        let out = convert_request(request(vec![], vec![span]), None);
        let attrs = &out.spans[0].attributes;
        let get = |key: &str| {
            attrs
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(get("str"), Some(Value::from("x")));
        assert_eq!(get("int"), Some(Value::I64(503)));
        assert_eq!(get("bool"), Some(Value::Bool(true)));
        assert_eq!(get("double"), Some(Value::F64(0.5)));
        assert_eq!(get("ints"), Some(Value::Array(Array::I64(vec![1, 2]))));
        assert_eq!(get("mixed"), Some(Value::from("[a,2]")));
        assert_eq!(get("map"), Some(Value::from("{k:v}")));
        assert_eq!(get("bytes"), Some(Value::from("dead")));
        assert_eq!(get("no-value"), None);
        assert_eq!(
            get("ai.cloud.role"),
            None,
            "ai.* attributes would become tags"
        );
        assert_eq!(attrs.len(), 8);
    }

    #[test]
    fn malformed_spans_are_counted_and_the_rest_kept() {
        let mut bad = Vec::new();
        let edits: [fn(&mut ProtoSpan); 7] = [
            |s: &mut ProtoSpan| s.trace_id = vec![1; 15],
            |s: &mut ProtoSpan| s.trace_id = vec![0; 16],
            |s: &mut ProtoSpan| s.span_id = vec![1; 4],
            |s: &mut ProtoSpan| s.span_id = vec![0; 8],
            |s: &mut ProtoSpan| s.span_id = Vec::new(),
            |s: &mut ProtoSpan| s.parent_span_id = vec![1; 3],
            |s: &mut ProtoSpan| s.start_time_unix_nano = 0,
        ];
        for edit in edits {
            let mut span = good_span();
            edit(&mut span);
            bad.push(span);
        }
        let mut zero_parent = good_span();
        zero_parent.parent_span_id = vec![0; 8];
        let mut spans = vec![good_span()];
        spans.extend(bad);
        spans.push(zero_parent);
        let out = convert_request(request(vec![], spans), None);
        assert_eq!(out.invalid, 7);
        assert_eq!(out.spans.len(), 2);
        assert_eq!(out.spans[1].parent_span_id, SpanId::INVALID);
        assert_eq!(
            out.first_error.as_deref(),
            Some("trace_id must be 16 bytes, not all zero (got 15 bytes)")
        );
    }

    #[test]
    fn identity_overrides_the_namespace_and_is_recorded() {
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let resource = vec![
            kv("service.name", s("web")),
            kv("service.namespace", s("payments")),
            kv("k8s.namespace.name", s("payments")),
            kv("k8s.pod.name", s("web-1")),
            kv(
                "trellis.identity",
                s("spiffe://cluster.local/ns/payments/sa/x"),
            ),
            kv("ai.cloud.role", s("payments.checkout")),
        ];
        let mut span = good_span();
        span.attributes = vec![
            kv("k8s.namespace.name", s("payments")),
            kv("url.path", s("/cart")),
        ];
        let out = convert_request(request(resource, vec![span]), Some(&peer));
        let span = &out.spans[0];
        let scope: Vec<KeyValue> = span.instrumentation_scope.attributes().cloned().collect();
        for attrs in [&scope, &span.attributes] {
            assert_eq!(attr(attrs, "service.namespace").as_deref(), Some("shop"));
            assert_eq!(attr(attrs, "k8s.namespace.name").as_deref(), Some("shop"));
            assert_eq!(attr(attrs, "service.name").as_deref(), Some("web"));
            assert_eq!(attr(attrs, "k8s.pod.name").as_deref(), Some("web-1"));
            assert_eq!(
                attr(attrs, IDENTITY_ATTRIBUTE).as_deref(),
                Some("spiffe://cluster.local/ns/shop/sa/web")
            );
            assert_eq!(attr(attrs, "ai.cloud.role"), None);
            let keys: Vec<&str> = attrs.iter().map(|kv| kv.key.as_str()).collect();
            let mut unique = keys.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "repeated keys: {keys:?}");
        }
        assert_eq!(attr(&span.attributes, "url.path").as_deref(), Some("/cart"));
    }

    #[test]
    fn a_missing_or_unknown_service_name_becomes_the_service_account() {
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        for resource in [
            vec![],
            vec![kv("service.name", s("unknown_service:proxy"))],
            vec![kv("service.name", s(""))],
        ] {
            let out = convert_request(request(resource, vec![good_span()]), Some(&peer));
            let scope: Vec<KeyValue> = out.spans[0]
                .instrumentation_scope
                .attributes()
                .cloned()
                .collect();
            assert_eq!(attr(&scope, "service.name").as_deref(), Some("web"));
        }
    }

    #[test]
    fn without_identity_the_resource_is_kept_but_cannot_claim_one() {
        let resource = vec![
            kv("service.namespace", s("payments")),
            kv(
                "trellis.identity",
                s("spiffe://cluster.local/ns/payments/sa/x"),
            ),
        ];
        let out = convert_request(request(resource, vec![good_span()]), None);
        let scope: Vec<KeyValue> = out.spans[0]
            .instrumentation_scope
            .attributes()
            .cloned()
            .collect();
        assert_eq!(
            attr(&scope, "service.namespace").as_deref(),
            Some("payments")
        );
        assert_eq!(attr(&scope, IDENTITY_ATTRIBUTE), None);
    }

    #[test]
    fn events_and_links_are_converted_and_bad_links_dropped() {
        let mut span = good_span();
        span.events = vec![span::Event {
            time_unix_nano: 1_700_000_000_100_000_000,
            name: "retry".to_owned(),
            attributes: vec![kv("attempt", any_value::Value::IntValue(2))],
            dropped_attributes_count: 0,
        }];
        span.links = vec![
            span::Link {
                trace_id: vec![7; 16],
                span_id: vec![8; 8],
                ..Default::default()
            },
            span::Link {
                trace_id: vec![7; 3],
                span_id: vec![8; 8],
                ..Default::default()
            },
        ];
        span.dropped_links_count = 1;
        let out = convert_request(request(vec![], vec![span]), None);
        let span = &out.spans[0];
        assert_eq!(span.events.len(), 1);
        assert_eq!(span.events[0].name, "retry");
        assert_eq!(span.events[0].attributes, vec![KeyValue::new("attempt", 2)]);
        assert_eq!(span.links.len(), 1);
        assert_eq!(
            span.links[0].span_context.span_id().to_string(),
            "0808080808080808"
        );
        assert_eq!(span.links.dropped_count, 2);
    }

    #[test]
    fn resources_are_capped_deduplicated_and_shared() {
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let mut resource = vec![
            kv("service.name", s("web")),
            // A repeated key: the last value is the one checked and kept.
            kv("service.name", s("unknown_service:x")),
            kv("k8s.deployment.name", s("payments.checkout")),
        ];
        resource.extend((0..100).map(|n| kv(&format!("extra.{n}"), s("v"))));
        let out = convert_request(request(resource, vec![good_span()]), Some(&peer));
        let scope: Vec<KeyValue> = out.spans[0]
            .instrumentation_scope
            .attributes()
            .cloned()
            .collect();
        // 32 kept (service.name, k8s.deployment.name, extra.0..=29), the old name replaced
        // by the service account, plus the namespace pair and the identity.
        assert_eq!(scope.len(), MAX_RESOURCE_ATTRIBUTES + 3, "{scope:?}");
        assert_eq!(attr(&scope, "service.name").as_deref(), Some("web"));
        assert_eq!(attr(&scope, "extra.29").as_deref(), Some("v"));
        assert_eq!(attr(&scope, "extra.30"), None);
        assert_eq!(attr(&scope, "k8s.namespace.name").as_deref(), Some("shop"));
        let names = scope.iter().filter(|kv| kv.key.as_str() == "service.name");
        assert_eq!(names.count(), 1);

        let array = shared(KeyValue::new(
            "a",
            Value::Array(Array::String(vec!["x".into(), "y".into()])),
        ));
        assert_eq!(array.value, Value::from(r#"["x","y"]"#));
        let int = shared(KeyValue::new("n", 7));
        assert_eq!(int.value, Value::I64(7));
    }

    #[test]
    fn span_count_counts_every_scope() {
        let mut req = request(vec![], vec![good_span(), good_span()]);
        req.resource_spans.push(req.resource_spans[0].clone());
        assert_eq!(span_count(&req), 4);
    }
}
