//! Opaque TCP: an echo server, a server-speaks-first variant (a greeting like SMTP's
//! `220 ready`, then echo), and clients for both.

use std::fmt;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{AppKind, Entry, Listen, Received, Recorder, accept_loop, connect, must_listen, timed};

/// What [`tcp_greeting_server`] says first, as an SMTP server would.
pub const GREETING: &[u8] = b"220 ready\r\n";

/// Echoes every byte back, on `listen` (a port on `0.0.0.0`, or a bound listener); one
/// [`Received`] per connection, recorded when it is accepted, its bytes appended as they
/// arrive. Runs until dropped.
pub async fn tcp_echo_server(listen: impl Listen, rec: Recorder) {
    serve(must_listen(listen, "tcp_echo_server"), Vec::new(), rec).await;
}

/// Writes `greeting` (e.g. [`GREETING`]) as soon as a connection is accepted, before
/// reading anything, then echoes like [`tcp_echo_server`]. Runs until dropped.
pub async fn tcp_greeting_server(listen: impl Listen, greeting: impl Into<Vec<u8>>, rec: Recorder) {
    let listener = must_listen(listen, "tcp_greeting_server");
    serve(listener, greeting.into(), rec).await;
}

async fn serve(listener: TcpListener, greeting: Vec<u8>, rec: Recorder) {
    accept_loop(listener, move |tcp, peer| {
        let entry = rec.push(Received::new(AppKind::Tcp, peer));
        let greeting = greeting.clone();
        async move {
            let mut tcp = tcp;
            if !greeting.is_empty() && tcp.write_all(&greeting).await.is_err() {
                return;
            }
            let _ = echo(&mut tcp, &entry).await;
        }
    })
    .await
}

/// Copies what `io` reads back to it, recording each read in `entry` first, until EOF
/// (then shuts down the write side).
pub(crate) async fn echo<S>(io: &mut S, entry: &Entry) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return io.shutdown().await;
        }
        entry.append_body(&buf[..n]);
        io.write_all(&buf[..n]).await?;
    }
}

/// Writes `data` and reads until as many bytes came back (or EOF), writing and reading at
/// once so large payloads do not deadlock; returns what came back.
pub async fn tcp_echo(addr: impl fmt::Display, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    timed(
        format!("TCP echo of {} bytes from {addr}", data.len()),
        async {
            let tcp = connect(&addr.to_string()).await?;
            exchange(tcp, data).await
        },
    )
    .await
}

async fn exchange(tcp: TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut r, mut w) = tcp.into_split();
    let write = async {
        w.write_all(data).await?;
        w.flush().await
    };
    let read = async {
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < data.len() {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(got)
    };
    let (written, got) = tokio::join!(write, read);
    let got = got?;
    if got.len() < data.len() {
        written?;
    }
    Ok(got)
}

/// What a server-speaks-first exchange saw.
#[derive(Debug, Clone)]
pub struct Greeted {
    /// The server's first line, CRLF included.
    pub greeting: Vec<u8>,
    /// How long the greeting took to arrive after connecting (a proxy that waits to detect
    /// the protocol delays it).
    pub waited: Duration,
    /// What came back after `data` was sent.
    pub echo: Vec<u8>,
}

/// Connects, waits for the server's first line without sending anything, then sends
/// `data` and reads its echo.
pub async fn tcp_greeting_echo(addr: impl fmt::Display, data: &[u8]) -> anyhow::Result<Greeted> {
    timed(format!("server-speaks-first exchange with {addr}"), async {
        let tcp = connect(&addr.to_string()).await?;
        let start = Instant::now();
        let mut reader = BufReader::new(tcp);
        let mut greeting = Vec::new();
        reader.read_until(b'\n', &mut greeting).await?;
        anyhow::ensure!(
            greeting.ends_with(b"\n"),
            "connection closed before the greeting ended: {:?}",
            String::from_utf8_lossy(&greeting)
        );
        let waited = start.elapsed();
        anyhow::ensure!(
            reader.buffer().is_empty(),
            "the server sent more than a greeting line before we spoke"
        );
        let echo = exchange(reader.into_inner(), data).await?;
        Ok(Greeted {
            greeting,
            waited,
            echo,
        })
    })
    .await
}
