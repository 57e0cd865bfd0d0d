//! `fleet-bench api`: what the HTTP API costs the replicated-write path.
//!
//! One 3-coordinator cluster, the same lock-write load as `fleet-bench
//! locks` (each client its own mTLS connection, alternating acquire and
//! release on its own destination), measured in alternating rounds:
//!
//! * **quiet**: no HTTP client at all;
//! * **watched**: on every coordinator, `--streams` dashboards, each one
//!   `GET /` and a live `GET /api/events` stream that receives every lock
//!   change (the bench's destinations are real destinations, so each lock
//!   flip is a `destination` event), plus one scraper that every
//!   `--poll-every` fetches what a dashboard and Prometheus fetch
//!   (`/api/deployments`, `/api/destinations`, `/api/locks`, `/api/cluster`,
//!   `/api/nodes`, `/metrics`), each over a new TLS connection.
//!
//! Rounds alternate quiet/watched, then watched/quiet (ABBA), so drift of
//! the machine over the run falls on both sides alike. The spread of the
//! quiet rounds among themselves is printed next to the difference: a
//! difference inside it is not a measurable cost. The coordinators' CPU per
//! write (from /proc) is printed too, since throughput can hide a cost that
//! the spare core absorbs.
//!
//! The change journal that feeds `/api/events` runs with or without
//! subscribers, so the quiet rounds include it: what the watched rounds add
//! is streaming, serving and the scraping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use fleet_tests::harness::Cluster;
use fleet_tests::https::Https;
use serde_json::json;

use crate::locks::{fleet_run, round3, RunResult};
use crate::procstat;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Client counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub clients: Vec<usize>,
    /// How long each round lasts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub round: Duration,
    /// Quiet/watched pairs per client count (their order alternates).
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// Dashboards (event streams) open on each coordinator in watched rounds.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// How often the scraper of each coordinator fetches its lists and `/metrics`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_every: Duration,
}

/// What the scraper fetches, as a dashboard and Prometheus would.
const SCRAPED: &[&str] = &["/api/deployments?limit=50", "/api/destinations", "/api/locks", "/api/cluster", "/api/nodes", "/metrics"];

/// The quiet or watched rounds of one client count, merged.
struct Side {
    rounds_ops_per_s: Vec<f64>,
    ops: usize,
    secs: f64,
    lat: Vec<Duration>,
    coord_cpu_ms: f64,
    events: u64,
    requests: u64,
}

impl Side {
    fn new() -> Side {
        Side { rounds_ops_per_s: vec![], ops: 0, secs: 0.0, lat: vec![], coord_cpu_ms: 0.0, events: 0, requests: 0 }
    }
    fn add(&mut self, r: RunResult, cpu_ms: f64, load: &LoadCount) {
        self.rounds_ops_per_s.push(r.ops as f64 / r.secs);
        self.ops += r.ops;
        self.secs += r.secs;
        self.lat.extend(r.lat);
        self.coord_cpu_ms += cpu_ms;
        self.events += load.events;
        self.requests += load.requests;
    }
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn merged(&mut self) -> RunResult {
        self.lat.sort();
        RunResult { system: "fleet", clients: 0, ops: self.ops, secs: self.secs, lat: std::mem::take(&mut self.lat) }
    }
    fn cpu_ms_per_write(&self) -> f64 {
        self.coord_cpu_ms / self.ops as f64
    }
}

#[derive(Default, Debug)]
struct LoadCount {
    events: u64,
    requests: u64,
}

/// The HTTP clients of a watched round, running until stopped.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    events: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    streams_open: Arc<AtomicU64>,
}

impl Load {
    async fn start(cluster: &Cluster, streams: usize, poll_every: Duration) -> anyhow::Result<Load> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let events = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let streams_open = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for &id in cluster.coords.keys() {
            let client = Https::new(cluster, id, "viewer")?;
            for _ in 0..streams {
                let (client, mut stopped, events, open) = (client.clone(), stopped.clone(), events.clone(), streams_open.clone());
                tasks.push(tokio::spawn(async move {
                    client.get("/").await?.expect(200)?;
                    let mut stream = client.events(None).await?;
                    // The first event (`hello`) says the stream is live.
                    stream.next(Duration::from_secs(10)).await.context("no hello on the event stream")?;
                    open.fetch_add(1, Ordering::Relaxed);
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return Ok(()),
                            e = stream.next(Duration::from_secs(60)) => {
                                e?;
                                events.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            let (mut stopped, requests) = (stopped.clone(), requests.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(poll_every);
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return Ok(()),
                        _ = tick.tick() => {
                            for path in SCRAPED {
                                client.get(path).await?.expect(200).with_context(|| format!("GET {path}"))?;
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }));
        }
        let load = Load { stop, tasks, events, requests, streams_open };
        let want = (streams * cluster.coords.len()) as u64;
        let l = &load;
        let ready = fleet_tests::harness::eventually("every dashboard stream open", Duration::from_secs(30), || async move {
            if l.tasks.iter().any(|t| t.is_finished()) {
                anyhow::bail!("a dashboard client ended before the round began");
            }
            Ok((l.streams_open.load(Ordering::Relaxed) >= want).then_some(()))
        })
        .await;
        if let Err(e) = ready {
            // The client that ended says why.
            return Err(match load.finish().await {
                Err(why) => why.context(e),
                Ok(_) => e,
            });
        }
        load.events.store(0, Ordering::Relaxed);
        load.requests.store(0, Ordering::Relaxed);
        Ok(load)
    }

    async fn finish(self) -> anyhow::Result<LoadCount> {
        let count = LoadCount { events: self.events.load(Ordering::Relaxed), requests: self.requests.load(Ordering::Relaxed) };
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.context("a dashboard client panicked")?.context("a dashboard client failed")?;
        }
        Ok(count)
    }
}

fn coord_cpu_ms(cluster: &Cluster) -> f64 {
    cluster.coords.keys().filter_map(|id| cluster.pid_of(*id)).map(procstat::cpu_ms).sum()
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, &[]).await.context("starting a Fleet cluster")?;
    // Real destinations, so every lock flip is a `destination` event on the streams.
    let mut yaml = String::from("destinations:\n");
    for &n in &args.clients {
        for k in 0..n {
            yaml.push_str(&format!("  - name: api-{n}-{k}\n    selector: {{ bench: api }}\n"));
        }
    }
    cluster.apply_destinations(&yaml).await?;
    // Warm up connections and the state machine's caches.
    fleet_run(&cluster, "api", args.clients[0], Duration::from_secs(1)).await?;

    let mut table = Vec::new();
    for &n in &args.clients {
        let (mut quiet, mut watched) = (Side::new(), Side::new());
        for pair in 0..args.pairs {
            let order = if pair % 2 == 0 { [false, true] } else { [true, false] };
            for watched_round in order {
                let load = if watched_round { Some(Load::start(&cluster, args.streams, args.poll_every).await?) } else { None };
                let cpu_before = coord_cpu_ms(&cluster);
                let r = fleet_run(&cluster, "api", n, args.round).await?;
                let cpu = coord_cpu_ms(&cluster) - cpu_before;
                let count = match load {
                    Some(l) => l.finish().await?,
                    None => LoadCount::default(),
                };
                if watched_round {
                    ensure!(count.events > 0, "the dashboards received no event while {} lock writes were made", r.ops);
                }
                println!(
                    "{}",
                    json!({"run": "api", "clients": n, "round": pair, "dashboards": if watched_round { args.streams * 3 } else { 0 },
                           "ops_per_s": (r.ops as f64 / r.secs).round(), "p50_ms": round3(r.q(0.5)), "p99_ms": round3(r.q(0.99)),
                           "coord_cpu_ms_per_write": round3(cpu / r.ops as f64), "events_streamed": count.events, "api_requests": count.requests})
                );
                if watched_round { &mut watched } else { &mut quiet }.add(r, cpu, &count);
            }
        }
        table.push((n, quiet, watched));
    }

    println!(
        "\n| clients | HTTP clients | rounds | ops/s | p50 ms | p99 ms | coordinator CPU ms / write | events streamed | API requests |\n|---|---|---|---|---|---|---|---|---|"
    );
    let mut verdicts = Vec::new();
    for (n, quiet, watched) in &mut table {
        for (label, side) in [("none".to_string(), &mut *quiet), (format!("{} dashboards + 3 scrapers", args.streams * 3), &mut *watched)] {
            let r = side.merged();
            println!(
                "| {n} | {label} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} |",
                side.rounds_ops_per_s.len(),
                side.ops_per_s(),
                r.q(0.5),
                r.q(0.99),
                side.cpu_ms_per_write(),
                side.events,
                side.requests
            );
            side.lat = r.lat;
        }
        let (lo, hi) = quiet.rounds_ops_per_s.iter().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        verdicts.push(format!(
            "{n} client(s): watched/quiet ops/s = {:.3} (quiet rounds ranged {lo:.0}–{hi:.0} ops/s, ±{:.1} % around their mean); coordinator CPU per write {:+.1} %",
            watched.ops_per_s() / quiet.ops_per_s(),
            (hi - lo) / 2.0 / quiet.ops_per_s() * 100.0,
            (watched.cpu_ms_per_write() / quiet.cpu_ms_per_write() - 1.0) * 100.0
        ));
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
    Ok(())
}
