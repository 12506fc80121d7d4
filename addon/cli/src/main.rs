//! `trellis`: the Trellis command-line tool.
//!
//! Owns the user-facing commands. Today: `trellis demo` (the local profile: the whole
//! mesh as processes on this machine) and the small demo app it runs, and `trellis ca`
//! (CA material in Key Vault or a `cacerts` directory, through `trellis-azure` and
//! `trellis-ca`), `trellis check` (the running mesh: CA expiry, proxies in sync; with
//! `--kubernetes`/`--pre`, an installed mesh or a cluster before install, through the
//! Kubernetes API), `trellis stat` (golden metrics from the proxies), `trellis dashboard`
//! (the same, as a live local web page with the service graph), `trellis tap`/`top` (the
//! proxies' live request stream) and `trellis inject` (the sidecar injector offline, on
//! YAML). Talks to the running binaries only through their command lines and HTTP
//! endpoints, and to a cluster only through the Kubernetes API.

mod ca;
mod check;
mod dashboard;
mod demo;
mod demo_app;
mod http;
mod inject;
mod stat;
mod tap;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Trellis: a service mesh for AKS, with a local profile for this machine.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Runs the local mesh: control plane, three workloads with their proxies, and a
    /// little traffic over mTLS, explained as it happens. Stops on Ctrl-C or --duration.
    Demo(demo::Args),
    /// CA material: create it in Key Vault or as a `cacerts` directory, show a chain and
    /// check expiry.
    Ca(ca::Args),
    /// Checks a running mesh (control plane, CA expiry, proxies on the latest config), or
    /// with --kubernetes one installed in a cluster, or with --pre a cluster before
    /// install. Exits 1 when a check fails.
    Check(check::Args),
    /// Golden metrics from the proxies: success rate, requests per second and latency
    /// percentiles per workload, service or edge.
    Stat(stat::Args),
    /// The live request stream of the proxies: every request as it finishes.
    Tap(tap::TapArgs),
    /// The busiest paths, live, from the proxies' request stream.
    Top(tap::TopArgs),
    /// Serves a local web page: the service graph and golden metrics, live.
    Dashboard(dashboard::Args),
    /// Adds the Trellis proxy to the pods and pod templates of YAML on stdin, as the
    /// sidecar injector does (the same decision); writes the result to stdout.
    Inject(inject::Args),
    /// The demo's application: an HTTP server that answers with who it is and who called.
    #[command(hide = true)]
    DemoApp {
        /// Workload name to report.
        #[arg(long)]
        name: String,
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Extra time before each answer (to show latency-aware balancing).
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        delay: Duration,
    },
}

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
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Ca(args) => ca::run(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Stat(args) => stat::run(args).await,
            Command::Tap(args) => tap::tap(args).await,
            Command::Top(args) => tap::top(args).await,
            Command::Dashboard(args) => dashboard::run(args).await,
            Command::Inject(args) => inject::run(args),
            Command::DemoApp {
                name,
                listen,
                delay,
            } => demo_app::run(name, listen, delay)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    });
    // Child processes are killed on drop; give the runtime a moment to reap them.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trellis: {e:#}");
            ExitCode::FAILURE
        }
    }
}
