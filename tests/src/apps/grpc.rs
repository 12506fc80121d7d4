//! gRPC: the `trellis.test.echo.v1.Echo` service (`tests/proto/echo.proto`) served by tonic
//! over h2c, and a client with a helper per RPC that returns the replies together with
//! the final status, its message and trailers, failures included.
//!
//! Deadlines: a helper given one sends it as `grpc-timeout` and enforces it itself, and
//! reports any failure that ends the call past it as `DEADLINE_EXCEEDED`, as gRPC clients
//! do (tonic's own enforcement, client or server side, would say `CANCELLED`). The
//! original status is kept in the message.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use super::{AppKind, Entry, Listen, Received, Recorder, must_listen, timed, xfcc_uri};

/// Generated code for `tests/proto/echo.proto`. Regenerate with
/// `TRELLIS_BLESS=1 cargo test -p trellis-e2e --test e2e generated`.
#[allow(
    missing_docs,
    unreachable_pub,
    rust_2018_idioms,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    rustdoc::bare_urls,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags
)]
pub mod pb {
    include!("../gen/trellis.test.echo.v1.rs");
}

pub use pb::{EchoReply, EchoRequest};

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};

/// The package-qualified service name, as in request paths.
pub const SERVICE: &str = "trellis.test.echo.v1.Echo";

/// A request with `message` and nothing else set.
pub fn echo_request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..EchoRequest::default()
    }
}

/// The echo gRPC server (h2c) on `listen` (a port on `0.0.0.0`, or a bound listener). One
/// [`Received`] per call: the request metadata (headers, `x-forwarded-client-cert`
/// included) and every request's `message`. Runs until dropped; its connections close then
/// too.
pub async fn grpc_server(listen: impl Listen, rec: Recorder) {
    let listener = must_listen(listen, "grpc_server");
    // tonic runs each connection in a task of its own; cancelling the token when this
    // future is dropped makes their sockets fail, so they end too.
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let incoming = futures_util::stream::unfold(listener, move |listener| {
        let stop = stop.clone();
        async move {
            let conn = listener.accept().await.map(|(tcp, _)| {
                let _ = tcp.set_nodelay(true);
                Guarded::new(tcp, stop)
            });
            Some((conn, listener))
        }
    });
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService { rec }))
        .serve_with_incoming(incoming)
        .await
        .unwrap_or_else(|e| panic!("grpc_server failed: {e}"));
}

/// A server connection that fails once its server is stopped.
struct Guarded {
    io: TcpStream,
    token: CancellationToken,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Guarded {
    fn new(io: TcpStream, token: CancellationToken) -> Self {
        let stopped = Box::pin(token.clone().cancelled_owned());
        Self { io, token, stopped }
    }

    /// `Err` once the server is stopped; otherwise registers for the stop.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.token.is_cancelled() || self.stopped.as_mut().poll(cx).is_ready() {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        Ok(())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The status a request with `fail_code` asks for.
fn failure(req: &EchoRequest) -> Status {
    let mut metadata = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(req.message.as_str()) {
        metadata.insert("x-detail", v);
    }
    metadata.insert_bin(
        "x-detail-bin",
        MetadataValue::from_bytes(req.message.as_bytes()),
    );
    Status::with_metadata(
        Code::from_i32(req.fail_code),
        format!("requested failure: {}", req.message),
        metadata,
    )
}

async fn delay(req: &EchoRequest) {
    if req.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
    }
}

#[derive(Debug, Clone)]
struct EchoService {
    rec: Recorder,
}

impl EchoService {
    /// Records the call; returns its entry and the caller named by the XFCC header.
    fn start<T>(&self, rpc: &str, req: &Request<T>) -> (Entry, String) {
        let headers = req.metadata().clone().into_headers();
        let caller = headers
            .get(super::XFCC)
            .and_then(|v| v.to_str().ok())
            .and_then(xfcc_uri)
            .unwrap_or_default();
        let peer = req
            .remote_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let entry = self.rec.push(Received {
            method: rpc.to_owned(),
            target: format!("/{SERVICE}/{rpc}"),
            headers,
            ..Received::new(AppKind::Grpc, peer)
        });
        (entry, caller)
    }
}

fn reply(req: &EchoRequest, caller: &str, index: u32) -> EchoReply {
    EchoReply {
        message: req.message.clone(),
        caller: caller.to_owned(),
        index,
    }
}

type ReplyStream = ReceiverStream<Result<EchoReply, Status>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let (entry, caller) = self.start("Unary", &req);
        let req = req.into_inner();
        entry.push_message(req.message.clone().into_bytes());
        delay(&req).await;
        if req.fail_code != 0 {
            return Err(failure(&req));
        }
        Ok(Response::new(reply(&req, &caller, 0)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let (entry, caller) = self.start("ServerStream", &req);
        let req = req.into_inner();
        entry.push_message(req.message.clone().into_bytes());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for i in 0..req.count.max(1) {
                delay(&req).await;
                if tx.send(Ok(reply(&req, &caller, i))).await.is_err() {
                    return;
                }
            }
            if req.fail_code != 0 {
                let _ = tx.send(Err(failure(&req))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let (entry, caller) = self.start("ClientStream", &req);
        let mut stream = req.into_inner();
        let mut messages = Vec::new();
        while let Some(req) = stream.message().await? {
            entry.push_message(req.message.clone().into_bytes());
            delay(&req).await;
            if req.fail_code != 0 {
                return Err(failure(&req));
            }
            messages.push(req.message);
        }
        Ok(Response::new(EchoReply {
            message: messages.join(","),
            caller,
            index: u32::try_from(messages.len()).unwrap_or(u32::MAX),
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let (entry, caller) = self.start("Bidi", &req);
        let mut stream = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut index = 0;
            loop {
                let req = match stream.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                entry.push_message(req.message.clone().into_bytes());
                delay(&req).await;
                if req.fail_code != 0 {
                    let _ = tx.send(Err(failure(&req))).await;
                    return;
                }
                if tx.send(Ok(reply(&req, &caller, index))).await.is_err() {
                    return;
                }
                index += 1;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// How a call ended and what it returned.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// Every reply received, in order (also those before a failure).
    pub replies: Vec<EchoReply>,
    /// The final status code (`Ok` on success).
    pub code: Code,
    /// The status message (`grpc-message`).
    pub message: String,
    /// The response headers (empty when the call failed before any).
    pub headers: MetadataMap,
    /// The trailers: on failure the metadata that came with the status (`x-detail`, ...);
    /// on a streaming success the stream's trailers.
    pub trailers: MetadataMap,
}

impl GrpcCall {
    fn new() -> Self {
        Self {
            replies: Vec::new(),
            code: Code::Ok,
            message: String::new(),
            headers: MetadataMap::new(),
            trailers: MetadataMap::new(),
        }
    }

    fn fail(&mut self, status: &Status) {
        self.code = status.code();
        self.message = status.message().to_owned();
        self.trailers = status.metadata().clone();
    }

    /// Whether the call ended with `OK`.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }

    /// The replies' messages.
    pub fn messages(&self) -> Vec<&str> {
        self.replies.iter().map(|r| r.message.as_str()).collect()
    }

    /// An ASCII trailer's value.
    pub fn trailer(&self, key: &str) -> Option<String> {
        self.trailers
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// A binary (`-bin`) trailer's value, decoded.
    pub fn trailer_bin(&self, key: &str) -> Option<Vec<u8>> {
        self.trailers
            .get_bin(key)
            .and_then(|v| v.to_bytes().ok())
            .map(|b| b.to_vec())
    }
}

/// A client of the echo service over one h2c connection (`http://<addr>`).
#[derive(Debug, Clone)]
pub struct GrpcClient {
    inner: EchoClient<Channel>,
    metadata: MetadataMap,
}

impl GrpcClient {
    /// Connects to `addr` (a `SocketAddr` or `host:port`; the `:authority` of every call).
    pub async fn connect(addr: impl fmt::Display) -> anyhow::Result<Self> {
        let uri = format!("http://{addr}");
        let channel = timed(format!("gRPC connect to {uri}"), async {
            Endpoint::from_shared(uri.clone())?
                .connect_timeout(Duration::from_secs(10))
                .connect()
                .await
                .map_err(|e| anyhow::anyhow!("gRPC connect to {uri}: {e:?}"))
        })
        .await?;
        Ok(Self {
            inner: EchoClient::new(channel),
            metadata: MetadataMap::new(),
        })
    }

    /// Sends ASCII metadata `key: value` with every call from now on.
    pub fn with_metadata(mut self, key: &str, value: &str) -> anyhow::Result<Self> {
        let key = tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes())?;
        self.metadata.insert(key, value.parse()?);
        Ok(self)
    }

    /// A request carrying this client's metadata and `deadline` as `grpc-timeout`.
    fn request<T>(&self, message: T, deadline: Option<Duration>) -> Request<T> {
        let mut req = Request::new(message);
        *req.metadata_mut() = self.metadata.clone();
        if let Some(d) = deadline {
            req.set_timeout(d);
        }
        req
    }

    /// `Unary(req)`.
    pub async fn unary(&mut self, req: EchoRequest, deadline: Option<Duration>) -> GrpcCall {
        let (mut call, started) = (GrpcCall::new(), Instant::now());
        let req = self.request(req, deadline);
        let client = &mut self.inner;
        let run = async {
            match client.unary(req).await {
                Ok(resp) => {
                    let (headers, reply, _) = resp.into_parts();
                    call.headers = headers;
                    call.replies.push(reply);
                }
                Err(status) => call.fail(&status),
            }
        };
        let ran = within(deadline, run).await;
        settle(&mut call, deadline, started, ran);
        call
    }

    /// `ServerStream(req)`: every reply until the stream ends.
    pub async fn server_stream(
        &mut self,
        req: EchoRequest,
        deadline: Option<Duration>,
    ) -> GrpcCall {
        let (mut call, started) = (GrpcCall::new(), Instant::now());
        let req = self.request(req, deadline);
        let client = &mut self.inner;
        let run = async {
            match client.server_stream(req).await {
                Ok(resp) => read_stream(resp, &mut call).await,
                Err(status) => call.fail(&status),
            }
        };
        let ran = within(deadline, run).await;
        settle(&mut call, deadline, started, ran);
        call
    }

    /// `ClientStream(reqs...)`.
    pub async fn client_stream(
        &mut self,
        reqs: Vec<EchoRequest>,
        deadline: Option<Duration>,
    ) -> GrpcCall {
        let (mut call, started) = (GrpcCall::new(), Instant::now());
        let req = self.request(futures_util::stream::iter(reqs), deadline);
        let client = &mut self.inner;
        let run = async {
            match client.client_stream(req).await {
                Ok(resp) => {
                    let (headers, reply, _) = resp.into_parts();
                    call.headers = headers;
                    call.replies.push(reply);
                }
                Err(status) => call.fail(&status),
            }
        };
        let ran = within(deadline, run).await;
        settle(&mut call, deadline, started, ran);
        call
    }

    /// `Bidi`, ping-pong: sends each request only after the reply to the previous one came
    /// back (so both directions must stream through), then half-closes and reads to the end.
    pub async fn bidi(&mut self, reqs: Vec<EchoRequest>, deadline: Option<Duration>) -> GrpcCall {
        let (mut call, started) = (GrpcCall::new(), Instant::now());
        let (tx, rx) = mpsc::channel(16);
        let req = self.request(ReceiverStream::new(rx), deadline);
        let client = &mut self.inner;
        let run = async {
            let mut reqs = reqs.into_iter();
            if let Some(first) = reqs.next() {
                let _ = tx.send(first).await;
            }
            let resp = match client.bidi(req).await {
                Ok(resp) => resp,
                Err(status) => return call.fail(&status),
            };
            let (headers, mut stream, _) = resp.into_parts();
            call.headers = headers;
            let mut next = reqs.next();
            loop {
                match stream.message().await {
                    Ok(Some(reply)) => call.replies.push(reply),
                    Ok(None) => break,
                    Err(status) => return call.fail(&status),
                }
                match next.take() {
                    Some(req) => {
                        let _ = tx.send(req).await;
                        next = reqs.next();
                    }
                    None => break,
                }
            }
            drop(tx);
            finish_stream(&mut stream, &mut call).await;
        };
        let ran = within(deadline, run).await;
        settle(&mut call, deadline, started, ran);
        call
    }
}

/// Runs `f` within `deadline` (or [`super::CLIENT_TIMEOUT`]): `DEADLINE_EXCEEDED` past it.
async fn within(deadline: Option<Duration>, f: impl Future<Output = ()>) -> Result<(), Status> {
    let limit = deadline.unwrap_or(super::CLIENT_TIMEOUT);
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Status::deadline_exceeded(format!("client deadline of {limit:?} exceeded")))
}

/// Ends `call` as a gRPC client reports it: a call that failed once its deadline had
/// passed failed with `DEADLINE_EXCEEDED`, whatever ended it (tonic's own client-side
/// enforcement of `grpc-timeout` says `CANCELLED`; a server's too).
fn settle(
    call: &mut GrpcCall,
    deadline: Option<Duration>,
    started: Instant,
    ran: Result<(), Status>,
) {
    if let Err(status) = ran {
        call.fail(&status);
    }
    if let Some(d) = deadline
        && !call.is_ok()
        && call.code != Code::DeadlineExceeded
        && started.elapsed() >= d
    {
        call.message = format!(
            "client deadline of {d:?} exceeded (the call ended with {:?}: {})",
            call.code, call.message
        );
        call.code = Code::DeadlineExceeded;
    }
}

async fn read_stream(resp: Response<Streaming<EchoReply>>, call: &mut GrpcCall) {
    let (headers, mut stream, _) = resp.into_parts();
    call.headers = headers;
    finish_stream(&mut stream, call).await;
}

/// Reads the rest of `stream` into `call`: replies, then trailers or the failure.
async fn finish_stream(stream: &mut Streaming<EchoReply>, call: &mut GrpcCall) {
    loop {
        match stream.message().await {
            Ok(Some(reply)) => call.replies.push(reply),
            Ok(None) => break,
            Err(status) => return call.fail(&status),
        }
    }
    match stream.trailers().await {
        Ok(trailers) => call.trailers = trailers.unwrap_or_default(),
        Err(status) => call.fail(&status),
    }
}
