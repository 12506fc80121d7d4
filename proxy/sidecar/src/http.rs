//! HTTP helpers shared by both directions: body type, hop-by-hop header rules, the
//! identity header, error responses and the access log.

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use tracing::info;

use crate::error::Error;
use crate::logging::AccessFormat;
use crate::metrics::Metrics;

/// Why a body stopped: hyper's errors on the app side, h2's on the peer side. A named
/// type rather than `Box<dyn Error>`: with the boxed trait object as the body error,
/// hyper's `Into<Box<dyn Error>>` bounds trip rustc's higher-ranked lifetime inference.
#[derive(Debug)]
pub struct BodyError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<hyper::Error> for BodyError {
    fn from(e: hyper::Error) -> Self {
        Self(Box::new(e))
    }
}

impl From<h2::Error> for BodyError {
    fn from(e: h2::Error) -> Self {
        Self(Box::new(e))
    }
}

impl From<Infallible> for BodyError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// The body type the proxy moves in both directions.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// The header carrying the caller's verified identity to the app, Istio/Envoy style:
/// `By=<this workload>;URI=<peer>`. Always overwritten: clients cannot forge it.
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Set by the outbound proxy on requests to a peer: the HTTP version the client app
/// spoke (`HTTP/1.1` or `HTTP/2`), so the inbound proxy speaks the same to its app
/// (gRPC needs HTTP/2 end to end). Removed before the app sees the request.
pub static ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1), plus the
/// legacy `proxy-connection`. A `static`, not a `const`: a const array of header names
/// is built and dropped again at every use.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the message's few names, most ruled out by length alone, noting which
    // hop-by-hop names are present; then removals of only those. Most requests carry
    // none; most responses carry only `connection: keep-alive`, whose token names a
    // header already on the list (no parse, no allocation for it).
    let mut present = [false; HOP_BY_HOP.len()];
    for k in headers.keys() {
        let name = k.as_str();
        if matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 18)
            && let Some(i) = HOP_BY_HOP.iter().position(|h| h == name)
        {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // present[0] is `connection`: the other names it lists go too.
    let named: Vec<HeaderName> = if present[0] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !n.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| n.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    for name in &named {
        headers.remove(name);
    }
}

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(BodyError::from)
        .boxed_unsync()
}

/// The response the client gets for a proxy error: status from [`Error::status`], a
/// one-line text body, and `x-trellis-error` naming the failing side.
pub fn error_response(e: &Error) -> Response<Body> {
    let mut resp = Response::new(full(format!("trellis: {e}\n")));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        "x-trellis-error",
        HeaderValue::from_static(e.side().as_str()),
    );
    resp
}

/// One access line in JSON (`proxy.accessLogFormat: json` in trellis-config): the same
/// field names for requests and connections, `null` where a field does not apply, so log
/// pipelines can rely on a fixed schema (docs/architecture.md, "Proxy logs").
#[derive(Debug, serde::Serialize)]
struct JsonAccess<'a> {
    time: String,
    /// `request` (HTTP) or `connection` (TCP, TLS, upgrades, passthrough).
    kind: &'static str,
    direction: &'a str,
    protocol: &'a str,
    src: &'a str,
    dst: &'a str,
    service: &'a str,
    /// `<namespace>/<name>` of the HTTPRoute the request followed; `null` when none did
    /// and for connections.
    route: Option<&'a str>,
    endpoint: &'a str,
    orig_dst: Option<&'a str>,
    method: Option<&'a str>,
    authority: Option<&'a str>,
    path: Option<&'a str>,
    status: Option<u16>,
    duration_ms: f64,
    bytes_sent: Option<u64>,
    bytes_received: Option<u64>,
    mtls: bool,
    error: &'a str,
    /// W3C trace id of the request; `null` for connections.
    trace_id: Option<&'a str>,
}

/// One finished request, logged as a single `access` event and counted.
#[derive(Debug)]
pub struct Access<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The app-side HTTP version (`HTTP/1.1`, `HTTP/2`).
    pub protocol: &'static str,
    /// Source identity (the client workload).
    pub src: &'a str,
    /// Destination identity (the server workload), or `-` when unrouted.
    pub dst: &'a str,
    /// Destination service, or `-`.
    pub service: String,
    /// The HTTPRoute followed (`<namespace>/<name>`), or `-`.
    pub route: String,
    /// Endpoint or app address, or `-`.
    pub endpoint: String,
    /// Request method.
    pub method: &'a http::Method,
    /// Request authority.
    pub authority: String,
    /// Request path.
    pub path: &'a str,
    /// The trace the request runs in (logged as 32 hex digits).
    pub trace_id: [u8; 16],
    /// When the request arrived.
    pub start: Instant,
}

// === impl Access ===

impl Access<'_> {
    /// The request's access line as known at the response head, to be written when the
    /// response ends ([`AccessLine::write`], from [`crate::telemetry::Observed`]) with the
    /// body sizes and the full duration; `None` when the access log is off (nothing is
    /// copied then).
    pub fn line(self, status: StatusCode, error: Option<&Error>) -> Option<AccessLine> {
        let format = crate::logging::access_format();
        if format == AccessFormat::Off || !tracing::enabled!(target: "access", tracing::Level::INFO)
        {
            return None;
        }
        Some(AccessLine {
            direction: self.direction,
            protocol: self.protocol,
            src: self.src.to_owned(),
            dst: self.dst.to_owned(),
            service: self.service,
            route: self.route,
            endpoint: self.endpoint,
            method: self.method.clone(),
            authority: self.authority,
            path: self.path.to_owned(),
            status: status.as_u16(),
            error: error.map(ToString::to_string).unwrap_or_default(),
            trace_id: self.trace_id,
            start: self.start,
        })
    }
}

/// `addr` as `Display` writes it, for access lines. IPv4 (every pod address here) is
/// built from integers: `core::fmt` took ~1,600 instructions per address, on every request.
pub fn addr_text(addr: std::net::SocketAddr) -> String {
    let std::net::SocketAddr::V4(v4) = addr else {
        return addr.to_string();
    };
    let mut num = itoa::Buffer::new();
    let mut s = String::with_capacity(21);
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(num.format(octet));
    }
    s.push(':');
    s.push_str(num.format(v4.port()));
    s
}

/// `a` `sep` `b` in one allocation, without `core::fmt` (service names per request).
pub fn joined(a: &str, sep: char, b: &str) -> String {
    let mut s = String::with_capacity(a.len() + 1 + b.len());
    s.push_str(a);
    s.push(sep);
    s.push_str(b);
    s
}

/// One request's access line, owned, waiting for its response to end.
#[derive(Debug)]
pub struct AccessLine {
    direction: &'static str,
    protocol: &'static str,
    src: String,
    dst: String,
    service: String,
    route: String,
    endpoint: String,
    method: http::Method,
    authority: String,
    path: String,
    status: u16,
    error: String,
    trace_id: [u8; 16],
    start: Instant,
}

/// Appends `s` as `{:?}` writes it (tracing's quoting of str fields), with a fast path for
/// the usual case of printable ASCII without quotes or backslashes, which `Debug` leaves
/// as it is: no per-character escape lookup on every access line.
fn push_quoted(line: &mut Vec<u8>, s: &str) {
    // A fold without early exit, so the compiler checks many bytes per instruction.
    let special = s.bytes().fold(false, |any, b| {
        any | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    });
    let plain = !special;
    if plain {
        line.reserve(s.len() + 2);
        line.push(b'"');
        line.extend_from_slice(s.as_bytes());
        line.push(b'"');
    } else {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(line, "{s:?}");
    }
}

impl AccessLine {
    /// Writes the access event (target `access`; fields are a stable interface that tests
    /// and log pipelines rely on): the request is over, `received` request body bytes came
    /// from the client and `sent` response body bytes went back.
    pub fn write(self, received: u64, sent: u64) {
        let elapsed = self.start.elapsed();
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let trace_id = crate::trace::hex(&self.trace_id);
        if crate::logging::access_format() == AccessFormat::Json {
            let record = JsonAccess {
                time: crate::logging::access_time().to_string(),
                kind: "request",
                direction: self.direction,
                protocol: self.protocol,
                src: &self.src,
                dst: &self.dst,
                service: &self.service,
                route: (self.route != "-").then_some(self.route.as_str()),
                endpoint: &self.endpoint,
                orig_dst: None,
                method: Some(self.method.as_str()),
                authority: Some(&self.authority),
                path: Some(&self.path),
                status: Some(self.status),
                duration_ms,
                bytes_sent: Some(sent),
                bytes_received: Some(received),
                mtls: true,
                error: &self.error,
                trace_id: Some(&trace_id),
            };
            if crate::logging::write_access_json(&record) {
                return;
            }
        }
        // Same fields, order and quoting as the tracing event below (str fields Debug,
        // `%` fields Display), so log pipelines see one format either way. Built with
        // byte pushes, not `write!`: formatting was ~6% of a hop's instructions.
        let direct = crate::logging::write_access(|line| {
            let mut num = itoa::Buffer::new();
            line.extend_from_slice(b"request direction=");
            push_quoted(line, self.direction);
            line.extend_from_slice(b" protocol=");
            push_quoted(line, self.protocol);
            line.extend_from_slice(b" src=");
            push_quoted(line, &self.src);
            line.extend_from_slice(b" dst=");
            push_quoted(line, &self.dst);
            for (name, value) in [
                (&b" service="[..], &self.service),
                (b" route=", &self.route),
                (b" endpoint=", &self.endpoint),
            ] {
                line.extend_from_slice(name);
                line.extend_from_slice(value.as_bytes());
            }
            line.extend_from_slice(b" method=");
            line.extend_from_slice(self.method.as_str().as_bytes());
            line.extend_from_slice(b" authority=");
            line.extend_from_slice(self.authority.as_bytes());
            line.extend_from_slice(b" path=");
            push_quoted(line, &self.path);
            line.extend_from_slice(b" status=");
            line.extend_from_slice(num.format(self.status).as_bytes());
            line.extend_from_slice(b" duration_ms=");
            // Milliseconds to the microsecond, from integers (not `f64` formatting).
            let micros = elapsed.as_micros();
            line.extend_from_slice(num.format(micros / 1000).as_bytes());
            line.push(b'.');
            let frac = micros % 1000;
            line.extend_from_slice(&[
                b'0' + (frac / 100) as u8,
                b'0' + (frac / 10 % 10) as u8,
                b'0' + (frac % 10) as u8,
            ]);
            line.extend_from_slice(b" bytes_sent=");
            line.extend_from_slice(num.format(sent).as_bytes());
            line.extend_from_slice(b" bytes_received=");
            line.extend_from_slice(num.format(received).as_bytes());
            line.extend_from_slice(b" mtls=true trace_id=");
            line.extend_from_slice(trace_id.as_bytes());
            line.extend_from_slice(b" error=");
            line.extend_from_slice(self.error.as_bytes());
            Ok(())
        });
        if direct {
            return;
        }
        info!(
            target: "access",
            direction = self.direction,
            protocol = self.protocol,
            src = self.src,
            dst = self.dst,
            service = %self.service,
            route = %self.route,
            endpoint = %self.endpoint,
            method = %self.method,
            authority = %self.authority,
            path = self.path,
            status = self.status,
            duration_ms = duration_ms,
            bytes_sent = sent,
            bytes_received = received,
            mtls = true,
            trace_id = %trace_id,
            error = %self.error,
            "request"
        );
    }
}

/// One finished tunnelled or passed-through connection (TCP, TLS, upgrades), logged
/// as a single `access` event with the byte counts.
#[derive(Debug)]
pub struct TunnelAccess {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `tcp`, `tls`, `upgrade:websocket`, ...
    pub protocol: String,
    /// Source identity.
    pub src: String,
    /// Destination identity, or `-` outside the mesh.
    pub dst: String,
    /// Destination service, `passthrough` outside the mesh.
    pub service: String,
    /// Endpoint or app address.
    pub endpoint: String,
    /// Where the client was connecting.
    pub orig_dst: String,
}

// === impl TunnelAccess ===

impl TunnelAccess {
    /// A record for a connection from `src` to `orig_dst`.
    pub fn new(
        direction: &'static str,
        protocol: &str,
        src: &str,
        orig_dst: impl ToString,
    ) -> Self {
        Self {
            direction,
            protocol: protocol.to_owned(),
            src: src.to_owned(),
            dst: "-".into(),
            service: "-".into(),
            endpoint: "-".into(),
            orig_dst: orig_dst.to_string(),
        }
    }

    /// Emits the event (target `access`) and counts the connection.
    pub fn finish(self, start: Instant, result: Result<(u64, u64), Error>, metrics: &Metrics) {
        let format = crate::logging::access_format();
        let (sent, received, error) = match &result {
            Ok((s, r)) => (*s, *r, String::new()),
            Err(e) => (0, 0, e.to_string()),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Error::OutsideMesh(_)) => "blocked",
            Err(Error::Denied(_)) => "denied",
            Err(_) => "error",
        };
        metrics
            .tcp_connections
            .get_or_create(&crate::metrics::TcpLabels {
                direction: self.direction,
                outcome,
            })
            .inc();
        if format == AccessFormat::Off {
            return;
        }
        if format == AccessFormat::Json && tracing::enabled!(target: "access", tracing::Level::INFO)
        {
            let record = JsonAccess {
                time: crate::logging::access_time().to_string(),
                kind: "connection",
                direction: self.direction,
                protocol: &self.protocol,
                src: &self.src,
                dst: &self.dst,
                service: &self.service,
                route: None,
                endpoint: &self.endpoint,
                orig_dst: Some(&self.orig_dst),
                method: None,
                authority: None,
                path: None,
                status: None,
                duration_ms: start.elapsed().as_secs_f64() * 1000.0,
                bytes_sent: Some(sent),
                bytes_received: Some(received),
                // Passed through or blocked connections never reach a mesh peer.
                mtls: self.dst != "-",
                error: &error,
                trace_id: None,
            };
            if crate::logging::write_access_json(&record) {
                return;
            }
        }
        info!(
            target: "access",
            direction = self.direction,
            protocol = %self.protocol,
            src = %self.src,
            dst = %self.dst,
            service = %self.service,
            endpoint = %self.endpoint,
            orig_dst = %self.orig_dst,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            error = %error,
            "connection"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "10.244.1.7:8080",
            "255.255.255.255:65535",
            "127.0.0.1:80",
            "[::1]:443",
            "[fd00::a:1]:9090",
        ] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(addr_text(addr), addr.to_string());
            assert_eq!(addr_text(addr), a);
        }
        assert_eq!(joined("web", '.', "demo"), "web.demo");
    }

    #[test]
    fn quoted_writes_what_debug_writes() {
        for s in [
            "",
            "/api/v1?x=1&y=2",
            "spiffe://trellis.local/ns/demo/sa/web",
            "say \"hi\"",
            "back\\slash",
            "tab\tnew\nline\u{7f}",
            "caf\u{e9} \u{200b}\u{301}",
            "'single'",
        ] {
            let mut line = Vec::new();
            push_quoted(&mut line, s);
            assert_eq!(
                String::from_utf8(line).unwrap(),
                format!("{s:?}"),
                "for {s:?}"
            );
        }
    }

    #[test]
    fn leaves_messages_without_hop_by_hop_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("web"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        // The length prefilter lets every hop-by-hop name through.
        for name in &HOP_BY_HOP {
            h.insert(name, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h, before, "{name} was kept");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn connection_tokens_of_listed_names_and_others_in_any_case_are_stripped() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, TE"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-Other ,close"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn error_response_names_the_side() {
        let r = error_response(&Error::NoRoute("x.demo".into()));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()["x-trellis-error"], "downstream");
        let r = error_response(&Error::Timeout(std::time::Duration::from_secs(1)));
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()["x-trellis-error"], "upstream");
    }
}
