//! `fleet-bench`: benchmarks run by `cargo xtask bench`, each printing JSON
//! lines and a markdown table (see docs/benchmarks.md).
//!
//! * `fleet-bench [locks] [--duration 5s ...]`: replicated lock writes,
//!   Fleet vs etcd (the default mode, see [`locks`]).
//! * `fleet-bench steps [--steps 200 --destinations 100 ...]`: the
//!   coordinator's overhead per saga step against the commit latency of the
//!   same cluster (see [`steps`]).
//! * `fleet-bench api [--streams 4 ...]`: replicated writes with and without
//!   dashboards streaming events and scrapers polling the HTTP API, in
//!   alternating rounds of one run (see [`api`]).
//! * `fleet-bench catchup [--state-mb 100 ...]`: scale (10,000
//!   destinations, 1,000 simulated nodes from [`simnode`], deployments over
//!   them), then how long a new coordinator takes to catch up with a large
//!   state, through the snapshot (see [`catchup`]).
//! * `fleet-bench sagas [--kills 20 ...]`: deployments in flight while the
//!   leader is killed; time until a new leader moves each on (see [`sagas`]).
//! * `fleet-bench history [--deployments 20000 ...]`: the replicated state's
//!   size as deployments accumulate, in process (see [`history`]).

mod api;
mod catchup;
mod history;
mod locks;
mod plot;
mod procstat;
mod sagas;
mod simnode;
mod steps;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Fleet benchmarks: replicated lock writes vs etcd (default), per-step deployment overhead (`steps`), the HTTP API's cost (`api`), scale with simulated nodes and a new member's catch-up (`catchup`), sagas across leader kills (`sagas`), the state's size as deployments accumulate (`history`)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Without a mode, the `locks` benchmark runs with these options.
    #[command(flatten)]
    locks: locks::Args,
}

#[derive(Subcommand)]
enum Mode {
    /// Fleet vs etcd: replicated writes, latency, failover, and the physical floor.
    Locks(locks::Args),
    /// Per-step overhead of a deployment (no-op hook steps) against the
    /// cluster's own commit latency, for one destination and for many at once.
    Steps(steps::Args),
    /// Replicated writes with and without dashboards streaming and
    /// scrapers polling the HTTP API (alternating rounds of one run).
    Api(api::Args),
    /// Scale (destinations, simulated nodes, deployments over them), then a
    /// new coordinator catching up with a large state (snapshot + log).
    Catchup(catchup::Args),
    /// Deployments in flight while the leader is killed (20 times): how
    /// long until a new leader moves each saga on.
    Sagas(sagas::Args),
    /// The replicated state's size, RSS and apply time as deployments
    /// accumulate (in process, no cluster): compaction and the history
    /// bound at work.
    History(history::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    fleet_tests::harness::install_crypto();
    match cli.mode {
        None => locks::run(cli.locks).await,
        Some(Mode::Locks(a)) => locks::run(a).await,
        Some(Mode::Steps(a)) => steps::run(a).await,
        Some(Mode::Api(a)) => api::run(a).await,
        Some(Mode::Catchup(a)) => catchup::run(a).await,
        Some(Mode::Sagas(a)) => sagas::run(a).await,
        Some(Mode::History(a)) => history::run(a).await,
    }
}
