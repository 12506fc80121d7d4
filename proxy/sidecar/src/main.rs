//! `trellis-proxy`: parse flags, then either run the proxy (`run`, also with no
//! subcommand) or program the pod's capture rules (`init`); exit 64 on bad flags.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use trellis_proxy::capture::InitArgs;
use trellis_proxy::{Args, Config};

/// The Trellis sidecar proxy.
///
/// With no subcommand, the flags are those of `run` (how local runs and the demo start it).
#[derive(Debug, Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Option<Args>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(Box<Args>),
    /// Program this network namespace's iptables so the app's TCP is captured by the
    /// proxy (run once per pod, as root, before the app starts).
    Init(InitArgs),
    /// Wait until this pod's proxy is ready (`GET /ready` on its admin port answers 200):
    /// the injected sidecar's postStart hook, which holds the app's containers until the
    /// proxy has its certificate and view. Exits 0 when ready, 1 at the timeout.
    Wait(WaitArgs),
}

/// Flags of `trellis-proxy wait`.
#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// The proxy's admin listener.
    #[arg(long, default_value = "127.0.0.1:15020")]
    admin: std::net::SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

/// EX_CONFIG from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match (cli.command, cli.run) {
        (Some(Command::Init(args)), _) => init(&args),
        (Some(Command::Wait(args)), _) => wait(&args),
        (Some(Command::Run(args)), _) => run(*args),
        (None, Some(args)) => run(args),
        // clap refuses an empty command line (`run` has required flags), so this is
        // only reached if that changes: still a configuration error.
        (None, None) => {
            eprintln!("trellis-proxy: no subcommand and no flags; see --help");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `trellis-proxy init`.
fn init(args: &InitArgs) -> ExitCode {
    match trellis_proxy::capture::run_init(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-proxy init: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `trellis-proxy wait`: polls `/ready` every 200 ms on a one-thread runtime.
fn wait(args: &WaitArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-proxy wait: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + args.timeout;
        let step = std::time::Duration::from_millis(200);
        loop {
            let attempt = tokio::time::timeout(step * 5, ready_status(args.admin)).await;
            let last = match attempt {
                Ok(Ok(status)) if status.starts_with("HTTP/1.1 200") => return ExitCode::SUCCESS,
                Ok(Ok(status)) => status,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 1s".to_owned(),
            };
            if tokio::time::Instant::now() >= deadline {
                eprintln!(
                    "trellis-proxy wait: the proxy at {} was not ready within {} (last: {last})",
                    args.admin,
                    humantime::format_duration(args.timeout)
                );
                return ExitCode::FAILURE;
            }
            tokio::time::sleep(step).await;
        }
    })
}

/// The status line `GET /ready` gets from the admin listener at `admin`.
async fn ready_status(admin: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(admin).await?;
    tcp.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut head = [0u8; 64];
    let n = tcp.read(&mut head).await?;
    Ok(String::from_utf8_lossy(&head[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}

/// `trellis-proxy run`.
fn run(args: Args) -> ExitCode {
    // Held until exit: dropping it flushes the log lines still queued.
    let _log = init_tracing();
    let cfg = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-proxy: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // One worker (the default) runs on a current-thread runtime: every task, timer and
    // socket on this thread, with no cross-thread wake-ups or work-stealing bookkeeping.
    let rt = if cfg.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.workers)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        match trellis_proxy::app::run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-proxy: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Logs go through [`trellis_proxy::logging`]: the access log is one line per request,
/// so lines are batched in memory and written by a background thread a few times a second.
/// If the writer thread cannot start, logs are written inline rather than lost.
fn init_tracing() -> Option<trellis_proxy::logging::FlushGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match trellis_proxy::logging::batch_writer(
        std::io::stdout(),
        trellis_proxy::logging::FLUSH_INTERVAL,
        trellis_proxy::logging::BATCH_LIMIT,
    ) {
        Ok((writer, guard)) => {
            trellis_proxy::logging::install_direct(writer.clone());
            builder.with_writer(writer).init();
            Some(guard)
        }
        Err(e) => {
            builder.with_writer(std::io::stdout).init();
            tracing::warn!("log writer thread did not start ({e}); logging inline");
            None
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
