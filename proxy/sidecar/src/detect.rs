//! Protocol detection on the first bytes a client sends, without consuming them.
//!
//! The decision is a pure function over a byte prefix ([`classify`]); [`detect`] peeks
//! at the socket until `classify` can decide or the detection timeout passes. A client
//! that sends nothing within the timeout is taken to speak a server-first protocol
//! (MySQL, SMTP, ...) and is forwarded as opaque TCP.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much we peek at most: enough for a request head or a ClientHello.
pub const PEEK_LIMIT: usize = 16 * 1024;
/// Longest HTTP method token we recognise.
const MAX_METHOD: usize = 16;

/// What the client speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x. `upgrade` is the first request's `Upgrade` header, if it asks for one
    /// (WebSocket and friends are then tunnelled as bytes).
    Http1 {
        /// The requested upgrade protocol, lowercase.
        upgrade: Option<String>,
    },
    /// HTTP/2 with prior knowledge (gRPC).
    Http2,
    /// TLS the app originates; passed through untouched, routed by SNI when useful.
    Tls {
        /// The ClientHello's server name.
        sni: Option<String>,
    },
    /// Anything else, or nothing within the detection timeout: bytes as they are.
    Opaque,
}

/// Classifies a byte prefix; `None` means "need more bytes".
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    // HTTP/2 preface, or a prefix of it.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // TLS handshake record (content type 22, major version 3).
    if buf[0] == 0x16 {
        if buf.len() < 2 {
            return None;
        }
        if buf[1] == 0x03 {
            return tls_sni(buf).map(|sni| Protocol::Tls { sni });
        }
        return Some(Protocol::Opaque);
    }
    http1(buf)
}

/// HTTP/1: a method token, a space, and (to see `Upgrade`) the whole head.
fn http1(buf: &[u8]) -> Option<Protocol> {
    let token_len = buf
        .iter()
        .take(MAX_METHOD + 1)
        .take_while(|b| b.is_ascii_uppercase())
        .count();
    if token_len == buf.len() && token_len <= MAX_METHOD {
        return None; // "GE" could still become "GET ".
    }
    if token_len == 0 || token_len > MAX_METHOD || buf[token_len] != b' ' {
        return Some(Protocol::Opaque);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let upgrade = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase());
            Some(Protocol::Http1 { upgrade })
        }
        Ok(httparse::Status::Partial) if buf.len() < PEEK_LIMIT => None,
        // A head longer than we peek, or one httparse rejects: let the HTTP server
        // answer it (431 / 400) rather than tunnelling garbage.
        Ok(httparse::Status::Partial) | Err(_) => Some(Protocol::Http1 { upgrade: None }),
    }
}

/// The SNI of a complete ClientHello record; `None` when more bytes are needed.
/// Malformed hellos yield `Some(None)` (TLS without a usable name).
fn tls_sni(buf: &[u8]) -> Option<Option<String>> {
    if buf.len() < 5 {
        return None;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return if 5 + record_len > PEEK_LIMIT {
            Some(None)
        } else {
            None
        };
    }
    Some(parse_sni(&buf[5..5 + record_len]))
}

/// Walks a ClientHello handshake message to the server_name extension.
fn parse_sni(hs: &[u8]) -> Option<String> {
    let mut r = Reader(hs);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let mut r = Reader(r.take(len)?);
    r.take(2 + 32)?; // client_version, random
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let comp = usize::from(r.u8()?);
    r.take(comp)?;
    let ext_len = usize::from(r.u16()?);
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let body = exts.take(len)?;
        if ty == 0 {
            let mut sn = Reader(body);
            let list = usize::from(sn.u16()?);
            let mut list = Reader(sn.take(list)?);
            while !list.0.is_empty() {
                let name_type = list.u8()?;
                let n = usize::from(list.u16()?);
                let name = list.take(n)?;
                if name_type == 0 {
                    let s = std::str::from_utf8(name).ok()?;
                    return Some(s.to_ascii_lowercase());
                }
            }
            return None;
        }
    }
    None
}

/// A bounds-checked big-endian reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// Peeks at `tcp` until the protocol is known. Nothing within `timeout` means a
/// server-first protocol: [`Protocol::Opaque`]. A client that closes before sending
/// anything is also opaque (there is nothing to parse).
pub async fn detect(tcp: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; PEEK_LIMIT];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(remaining, tcp.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Protocol::Opaque),
        };
        if n == 0 {
            return Ok(Protocol::Opaque);
        }
        if let Some(p) = classify(&buf[..n]) {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            // Partial but plausible: HTTP/1 heads that trickle in are still HTTP.
            return Ok(if buf[0].is_ascii_uppercase() {
                Protocol::Http1 { upgrade: None }
            } else {
                Protocol::Opaque
            });
        }
        // Peek returns what is buffered at once; wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let mut list = vec![0u8];
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(n);
            let mut body = (list.len() as u16).to_be_bytes().to_vec();
            body.extend(list);
            exts.extend(0u16.to_be_bytes());
            exts.extend((body.len() as u16).to_be_bytes());
            exts.extend(body);
        }
        // An unrelated extension first, as real clients send many.
        let mut all = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00];
        all.extend(exts);
        let mut hello = vec![0x03, 0x03];
        hello.extend([7u8; 32]);
        hello.push(0); // session id
        hello.extend([0x00, 0x02, 0x13, 0x01]); // one suite
        hello.extend([0x01, 0x00]); // null compression
        hello.extend((all.len() as u16).to_be_bytes());
        hello.extend(all);
        let mut hs = vec![0x01];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(hello);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn http2_preface_and_its_prefixes() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        let mut more = H2_PREFACE.to_vec();
        more.extend([0, 0, 0, 4]);
        assert_eq!(classify(&more), Some(Protocol::Http2));
    }

    #[test]
    fn http1_heads_with_and_without_upgrade() {
        let plain = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(classify(plain), Some(Protocol::Http1 { upgrade: None }));
        let ws =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n";
        assert_eq!(
            classify(ws),
            Some(Protocol::Http1 {
                upgrade: Some("websocket".into())
            })
        );
        let h2c = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n\r\n";
        assert_eq!(
            classify(h2c),
            Some(Protocol::Http1 {
                upgrade: Some("h2c".into())
            })
        );
        assert_eq!(
            classify(b"POST /x HTTP/1.1\r\nHost: a\r\n"),
            None,
            "head still arriving"
        );
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"DELETE"), None);
    }

    #[test]
    fn tls_client_hello_yields_sni() {
        let hello = client_hello(Some("Web.Demo.svc"));
        assert_eq!(
            classify(&hello),
            Some(Protocol::Tls {
                sni: Some("web.demo.svc".into())
            })
        );
        assert_eq!(
            classify(&client_hello(None)),
            Some(Protocol::Tls { sni: None })
        );
        assert_eq!(
            classify(&hello[..hello.len() - 1]),
            None,
            "record incomplete"
        );
        assert_eq!(classify(&hello[..3]), None);
    }

    #[test]
    fn malformed_tls_is_tls_without_name() {
        let mut bad = client_hello(Some("x"));
        bad[6] = 0xff; // corrupt the handshake length
        assert_eq!(classify(&bad), Some(Protocol::Tls { sni: None }));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            Some(Protocol::Tls { sni: None })
        );
    }

    #[test]
    fn everything_else_is_opaque() {
        for b in [
            &b"\x00\x01binary"[..],
            b"ssh-2.0",
            b"get / http/1.1",
            b"GET/ HTTP/1.1",
            b"\x16\x01",
            b"HELLO_WORLD_TOO_LONG_METHOD x",
        ] {
            assert_eq!(classify(b), Some(Protocol::Opaque), "{b:?}");
        }
    }

    #[test]
    fn no_prefix_panics() {
        // Every prefix of every sample classifies without panicking.
        let samples = [
            client_hello(Some("a.b")),
            H2_PREFACE.to_vec(),
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n".to_vec(),
        ];
        for s in &samples {
            for i in 0..=s.len() {
                let _ = classify(&s[..i]);
            }
        }
        for i in 0..2000u32 {
            let junk: Vec<u8> = (0..(i % 64))
                .map(|j| (i.wrapping_mul(2654435761).wrapping_add(j * 40503) >> 7) as u8)
                .collect();
            let mut t = vec![0x16, 0x03, 0x01, 0x00, junk.len() as u8];
            t.extend(&junk);
            let _ = classify(&t);
            let _ = classify(&junk);
        }
    }
}
