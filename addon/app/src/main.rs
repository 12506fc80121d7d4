//! `trellis-addon`: the Trellis control plane. Thin: parse flags, set up logging, hand
//! over to [`app`]. Exit codes: 0 ok, 64 bad configuration (names the file and field),
//! 1 anything else (e.g. a port in use, named in the message).

mod admin;
mod app;
mod azure;
mod ca;
mod cli;
mod cluster;
mod config_watch;
mod injector;
mod mesh_config;
mod tls;
mod webhook;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
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
            return ExitCode::from(cli::EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    cli.run()
}
