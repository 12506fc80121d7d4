//! WebSocket (plain `ws://`): a `tokio-tungstenite` echo server, a client that sends
//! messages and returns the echoes, and a raw handshake that shows the `101` response as it
//! came off the socket.

use std::fmt;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use super::http1::{HttpResponse, read_response_head};
use super::{AppKind, Entry, Listen, Received, Recorder, accept_loop, connect, must_listen, timed};

/// The `Sec-WebSocket-Key` [`ws_handshake`] sends (RFC 6455's example).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The `Sec-WebSocket-Accept` a server must answer to [`WS_KEY`].
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The header [`ws_server`] adds to its `101` response, to check response headers pass.
pub const WS_SERVER_HEADER: (&str, &str) = ("x-app", "ws-echo");

/// A WebSocket data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsFrame {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
}

impl WsFrame {
    fn into_message(self) -> Message {
        match self {
            Self::Text(t) => Message::text(t),
            Self::Binary(b) => Message::binary(b),
        }
    }

    fn from_message(m: Message) -> Option<Self> {
        match m {
            Message::Text(t) => Some(Self::Text(t.as_str().to_owned())),
            Message::Binary(b) => Some(Self::Binary(b.to_vec())),
            _ => None,
        }
    }
}

/// The WebSocket echo server (any path): echoes text and binary
/// messages, answers pings and close. Its `101` carries [`WS_SERVER_HEADER`] and selects the
/// first `Sec-WebSocket-Protocol` offered. One [`Received`] per connection: the handshake
/// request and every data message. Listens on `listen` (a port on `0.0.0.0`, or a bound
/// listener); runs until dropped.
pub async fn ws_server(listen: impl Listen, rec: Recorder) {
    let listener = must_listen(listen, "ws_server");
    accept_loop(listener, move |tcp, peer| {
        let rec = rec.clone();
        async move {
            let mut entry: Option<Entry> = None;
            // The signature is tungstenite's.
            #[allow(clippy::result_large_err)]
            let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                entry = Some(rec.push(Received {
                    method: req.method().to_string(),
                    target: req.uri().to_string(),
                    headers: req.headers().clone(),
                    ..Received::new(AppKind::WebSocket, peer)
                }));
                let h = resp.headers_mut();
                h.insert(
                    WS_SERVER_HEADER.0,
                    http::HeaderValue::from_static(WS_SERVER_HEADER.1),
                );
                let offered = req
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(',').next())
                    .and_then(|p| http::HeaderValue::from_str(p.trim()).ok());
                if let Some(protocol) = offered {
                    h.insert("sec-websocket-protocol", protocol);
                }
                Ok(resp)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                return;
            };
            let Some(entry) = entry else { return };
            while let Some(Ok(msg)) = ws.next().await {
                match msg {
                    Message::Text(_) | Message::Binary(_) => {
                        let data = msg.clone().into_data().to_vec();
                        entry.append_body(&data);
                        entry.push_message(data);
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                    // tungstenite queues the pong / close reply; flush sends it.
                    Message::Ping(_) | Message::Close(_) => {
                        if ws.flush().await.is_err() {
                            return;
                        }
                    }
                    Message::Pong(_) | Message::Frame(_) => {}
                }
            }
        }
    })
    .await
}

/// Opens `ws://<addr><path>`, sends each of `messages` and waits for its echo before the
/// next, closes cleanly; returns the echoes in order.
pub async fn ws_echo(
    addr: impl fmt::Display,
    path: &str,
    messages: &[WsFrame],
) -> anyhow::Result<Vec<WsFrame>> {
    let url = format!("ws://{addr}{path}");
    timed(format!("WebSocket echo with {url}"), async {
        let tcp = connect(&addr.to_string()).await?;
        let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .map_err(|e| anyhow::anyhow!("WebSocket handshake with {url}: {e}"))?;
        let mut echoes = Vec::new();
        for m in messages {
            ws.send(m.clone().into_message()).await?;
            loop {
                let reply = ws.next().await.ok_or_else(|| {
                    anyhow::anyhow!("{url} closed after {} echoes", echoes.len())
                })??;
                if let Some(frame) = WsFrame::from_message(reply) {
                    echoes.push(frame);
                    break;
                }
            }
        }
        ws.close(None).await?;
        // Read until the server's close arrives (the stream then ends).
        while let Some(Ok(_)) = ws.next().await {}
        Ok(echoes)
    })
    .await
}

/// A WebSocket handshake by hand: `GET path` with `Upgrade: websocket`, [`WS_KEY`] and
/// `Sec-WebSocket-Protocol: echo`; returns the response exactly as it arrived. When it is a
/// `101`, also sends one masked text frame `raw hello` and puts the payload of the frame
/// that comes back in `body`, proving the upgraded connection carries frames.
pub async fn ws_handshake(addr: impl fmt::Display, path: &str) -> anyhow::Result<HttpResponse> {
    timed(format!("raw WebSocket handshake with {addr}"), async {
        let mut tcp = BufReader::new(connect(&addr.to_string()).await?);
        let head = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: {WS_KEY}\r\nsec-websocket-version: 13\r\n\
             sec-websocket-protocol: echo\r\n\r\n"
        );
        tcp.get_mut().write_all(head.as_bytes()).await?;
        let mut resp = read_response_head(&mut tcp).await?;
        if resp.status != 101 {
            super::http1::read_response_body(&mut tcp, &mut resp).await?;
            return Ok(resp);
        }
        let payload = b"raw hello";
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        tcp.get_mut().write_all(&frame).await?;
        let mut hdr = [0u8; 2];
        tcp.read_exact(&mut hdr).await?;
        let len = match hdr[1] & 0x7f {
            126 => u64::from(tcp.read_u16().await?),
            127 => tcp.read_u64().await?,
            n => u64::from(n),
        };
        anyhow::ensure!(hdr[1] & 0x80 == 0, "the server masked its frame");
        anyhow::ensure!(len <= 1 << 20, "a {len}-byte frame in answer to 9 bytes");
        let mut body = vec![0u8; len as usize];
        tcp.read_exact(&mut body).await?;
        resp.body_len = len;
        resp.body = body;
        Ok(resp)
    })
    .await
}
