//! `fleetctl`: parse the command line, run the command, exit with its code.
//! The commands are in `cli` (what can be typed) and `cmd` (what it does);
//! the library (`fleetctl::*`) holds what the tests share.

use std::process::ExitCode;

use clap::Parser as _;
use fleetctl::exit;

mod cli;
mod cmd;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetctl: cannot start the async runtime: {e}");
            return ExitCode::from(exit::CLUSTER as u8);
        }
    };
    match rt.block_on(cmd::run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(cmd::Exit(code, e)) => {
            eprintln!("fleetctl: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}
