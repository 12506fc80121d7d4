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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers)
        .enable_all()
        .build()
    {
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

/// Logs go through a background writer: the access log is one line per request, and
/// writing it from the request path cost a syscall and a contended stdout lock each.
/// Lines are dropped (and counted by tracing-appender) rather than blocking requests when
/// stdout cannot keep up.
fn init_tracing() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The default queue preallocates 128k lines (~4 MiB of RSS); 8k lines is seconds of
    // access log at thousands of requests per second.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(8 * 1024)
        .lossy(true)
        .finish(std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(writer)
        .init();
    guard
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
