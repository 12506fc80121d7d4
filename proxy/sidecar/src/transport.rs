//! Connection plumbing shared by the listeners: the accept loop (one tracked task per
//! connection) and serving an HTTP connection until it ends or the proxy drains.

use std::future::Future;
use std::net::SocketAddr;

use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Accepts on `listener` until `shutdown`, running `handle` for each connection as a
/// task in `tasks` (so the drain can wait for it).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                // Typically EMFILE: keep serving the connections we have.
                Err(error) => { warn!(%error, listener = what, "accept failed"); continue; }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        tasks.spawn(handle(tcp, remote));
    }
}

/// Drives `conn` to completion; on `shutdown` asks it to finish in-flight requests and
/// stop (HTTP/2 GOAWAY, HTTP/1 `Connection: close`), then waits for it.
pub async fn serve_until<C>(
    conn: C,
    shutdown: &CancellationToken,
    remote: SocketAddr,
    what: &'static str,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(error) = r { debug!(%error, %remote, listener = what, "connection ended") },
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
