//! What each command does: one module per command group, dispatched by
//! [`run`]. Shared plumbing (exit codes, the client from flags, error
//! lines) is in `common`.

mod certs;
mod cluster;
mod common;
mod deploy;
mod deployments;
mod destinations;
mod dev;
mod lock;
mod nodes;
mod servers;
mod tokens;

use clap::CommandFactory as _;
use fleetctl::exit;

pub use common::Exit;

use crate::cli::{Cli, Cmd};

/// Run the command; the exit code to end with.
pub async fn run(cli: Cli) -> Result<i32, Exit> {
    let (conn, out) = (&cli.conn, cli.output);
    match cli.cmd {
        Cmd::Deploy(a) => deploy::deploy(a, conn, out).await,
        Cmd::Rollback(a) => deploy::rollback(a, conn, out).await,
        Cmd::Watch { id } => deployments::watch(id, conn, out).await,
        Cmd::Status { id } => deployments::status(id, conn, out).await,
        Cmd::List { limit } => deployments::list(limit, conn, out).await,
        Cmd::History { audit: true, limit, .. } => tokens::audit(limit, conn, out).await,
        Cmd::History { app, destination, limit, audit: false } => deployments::history(app, destination, limit, conn, out).await,
        Cmd::Cancel { id, reason, wait } => deployments::cancel(id, reason, wait, conn, out).await,
        Cmd::Resolve { id, note } => deployments::resolve(id, note, conn, out).await,
        Cmd::Promote { id, wait } => deploy::promote(id, wait, conn, out).await,
        Cmd::Destinations { cmd } => destinations::destinations(cmd, conn, out).await,
        Cmd::Nodes => nodes::nodes(conn, out).await,
        Cmd::Servers { destination } => servers::servers(destination, conn, out).await,
        Cmd::Lock(cmd) => lock::lock(cmd, conn, out).await,
        Cmd::Cluster(cmd) => cluster::cluster(cmd, conn, out).await,
        Cmd::Tokens(cmd) => tokens::tokens(cmd, conn, out).await,
        Cmd::Certs(cmd) => certs::certs(cmd, out),
        Cmd::Dev(cmd) => dev::dev(cmd, out).await,
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "fleetctl", &mut std::io::stdout());
            Ok(exit::OK)
        }
    }
}
