//! `fleet-bench locks` (the default mode): replicated writes per second and
//! latency for a 3-coordinator Fleet cluster and a 3-member etcd cluster,
//! driven by the same harness in the same run, plus the machine's floor
//! (fdatasync of a small append + a loopback round trip) and kill -9 leader
//! failover.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleet_tests::harness::{acquire, eventually, release, Cluster};
use serde_json::json;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Client counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub clients: Vec<usize>,
    /// How long each run lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The reference script that starts etcd (`--serve` mode).
    #[arg(long, default_value = "../shared/bench/etcd-baseline.sh")]
    pub etcd_script: String,
    /// Skip etcd (Fleet and the floor only).
    #[arg(long)]
    pub skip_etcd: bool,
    /// A directory holding the `fleet-coord` binary of an earlier build:
    /// its cluster runs beside this build's, round for round, as
    /// `fleet@baseline` (how a change is measured against what it changed).
    #[arg(long)]
    pub baseline_bin_dir: Option<std::path::PathBuf>,
    /// Runs per client count and system, interleaved between the systems,
    /// the order rotating each round (use as many rounds as systems, or a
    /// multiple, so each runs first equally often); the table sums them
    /// (ops/s over all rounds, latency over all operations) and the JSON
    /// lines show each round.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Leader kills per system: each kill -9s the leader, times the first
    /// acknowledged write, restarts the killed member and waits until it
    /// has caught up before the next.
    #[arg(long, default_value_t = 20)]
    pub failovers: usize,
    /// An extra `fleet-coord` argument for this build's cluster only
    /// (repeatable), e.g. `--coord-arg=--election-timeout-ms=200` to
    /// measure a setting against the baseline's defaults.
    #[arg(long = "coord-arg", allow_hyphen_values = true)]
    pub coord_args: Vec<String>,
    /// Also draw the throughput and p50/p99 latency of every system
    /// against the client count to this PNG file.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub system: &'static str,
    pub clients: usize,
    pub ops: usize,
    pub secs: f64,
    /// Every operation's latency, sorted.
    pub lat: Vec<Duration>,
}

impl RunResult {
    /// Fold another run of the same system and client count into this one.
    pub fn add(&mut self, other: RunResult) {
        self.ops += other.ops;
        self.secs += other.secs;
        self.lat.extend(other.lat);
        self.lat.sort();
    }

    pub fn q(&self, f: f64) -> f64 {
        if self.lat.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat.len() as f64) * f) as usize;
        self.lat[i.min(self.lat.len() - 1)].as_secs_f64() * 1000.0
    }
    fn report(&self) -> serde_json::Value {
        json!({"system": self.system, "clients": self.clients, "ops": self.ops,
               "ops_per_s": (self.ops as f64 / self.secs).round(), "p50_ms": round3(self.q(0.5)), "p99_ms": round3(self.q(0.99))})
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The `f` quantile of `v` in milliseconds; NaN when `v` is empty (e.g.
/// `--failovers 0`).
pub fn percentile(mut v: Vec<Duration>, f: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[((v.len() as f64 * f) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // etcd first: if it cannot start, nothing else is worth running. Its
    // script is stopped however the rest ends.
    let etcd = match args.skip_etcd {
        true => None,
        false => Some(start_etcd(&args.etcd_script)?),
    };
    let result = compare(&args, etcd.as_ref().map(|(_, endpoints)| endpoints.as_slice())).await;
    if let Some(script) = etcd.map(|(script, _)| script) {
        stop_etcd(script);
    }
    let (rows, mut failovers, floor, stages) = result?;
    // etcd's failovers each on a cluster of their own (the script's ports
    // are fixed, so after the one above is gone): a member it killed does
    // not come back when started again by hand with the script's flags.
    if !args.skip_etcd {
        let mut times = Vec::new();
        for _ in 0..args.failovers {
            let (script, endpoints) = start_etcd(&args.etcd_script)?;
            let t = etcd_failover_run(&endpoints).await;
            stop_etcd(script);
            times.push(t?);
        }
        print_failover("etcd-3.4", &times);
        failovers.push(("etcd-3.4", times));
    }

    println!("\n| system | clients | ops/s | p50 ms | p99 ms |\n|---|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {:.0} | {:.3} | {:.3} |", r.system, r.clients, r.ops as f64 / r.secs, r.q(0.5), r.q(0.99));
    }
    println!("\n| kill -9 leader → first acknowledged write | kills | p50 s | p99 s | max s |\n|---|---|---|---|---|");
    for (system, times) in failovers.iter().filter(|(_, times)| !times.is_empty()) {
        let q = |f| percentile(times.clone(), f) / 1000.0;
        println!("| {system} | {} | {:.3} | {:.3} | {:.3} |", times.len(), q(0.5), q(0.99), q(1.0));
    }
    println!("floor: {floor}");
    print_stages(&rows, &stages);
    if let Some(path) = &args.plot {
        crate::plot::draw(path, &rows).with_context(|| format!("plotting to {}", path.display()))?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

fn stop_etcd(mut script: std::process::Child) {
    // SIGTERM: the script's trap kills its etcd members.
    let _ = Command::new("kill").arg(script.id().to_string()).status();
    let _ = script.wait();
}

fn print_failover(system: &str, times: &[Duration]) {
    if times.is_empty() {
        return;
    }
    let q = |f| round3(percentile(times.to_vec(), f) / 1000.0);
    println!(
        "{}",
        json!({"system": system, "run": "failover_kill9_leader_until_write_ok", "kills": times.len(),
               "p50_s": q(0.5), "p99_s": q(0.99), "max_s": q(1.0),
               "each_s": times.iter().map(|t| round3(t.as_secs_f64())).collect::<Vec<_>>()})
    );
}

/// Kill-9 failover times per system, in the order they ran.
type Failovers = Vec<(&'static str, Vec<Duration>)>;

/// The systems under comparison in one run.
enum System<'a> {
    Fleet(&'static str, &'a Cluster),
    Etcd(&'a [String]),
}

async fn compare(args: &Args, etcd: Option<&[String]>) -> anyhow::Result<(Vec<RunResult>, Failovers, serde_json::Value, Vec<Stages>)> {
    let mut rows = Vec::new();
    let mut stages: Vec<Stages> = Vec::new();
    let coord_args: Vec<&str> = args.coord_args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start(3, &coord_args).await.context("starting a Fleet cluster")?;
    let mut baseline = match &args.baseline_bin_dir {
        Some(dir) => Some(Cluster::start_with(dir.join("fleet-coord"), 3, &[]).await.context("starting the baseline cluster")?),
        None => None,
    };
    let floor = floor(cluster.path())?;
    println!("{}", floor);
    println!("{}", rpc_without_raft(&cluster, 1000).await?);
    // A leader change under load (a follower that missed heartbeats) shows
    // as a higher term after the runs than before.
    let mut terms = vec![("fleet", cluster.status().await?.term)];
    if let Some(b) = &baseline {
        terms.push(("fleet@baseline", b.status().await?.term));
    }
    // Every system runs each client count once per round, in turn, so a
    // machine that gets busier or quieter affects them alike. The turn
    // rotates from round to round, so a cost of going first (or last) is
    // shared: in two runs the system run first came out 9-13 % lower at
    // 256 clients whatever it was (docs/benchmarks.md). With as many
    // rounds as systems each is first once. The first round keeps the
    // order the table lists them in.
    for &n in &args.clients {
        let mut runs: Vec<RunResult> = Vec::new();
        for round in 0..args.rounds.max(1) {
            let mut systems = vec![System::Fleet("fleet", &cluster)];
            systems.extend(baseline.as_ref().map(|b| System::Fleet("fleet@baseline", b)));
            systems.extend(etcd.map(System::Etcd));
            let first = round % systems.len();
            systems.rotate_left(first);
            for system in systems {
                let r = match system {
                    System::Fleet(name, c) => {
                        // This build's coordinators report each stage of a
                        // write on /metrics (a baseline build may not).
                        let before = if name == "fleet" { Some(stage_totals(c).await?) } else { None };
                        let mut r = fleet_run(c, "bench", n, args.duration).await?;
                        if let Some(before) = before {
                            let leader = c.status().await?.leader_id;
                            let after = stage_totals(c).await?;
                            let s = Stages::between(n, leader, &before, &after);
                            println!("{}", s.report());
                            match stages.iter_mut().find(|x| x.clients == n) {
                                Some(sum) => sum.add(&s),
                                None => stages.push(s),
                            }
                        }
                        r.system = name;
                        r
                    }
                    System::Etcd(endpoints) => etcd_run(endpoints, n, args.duration).await?,
                };
                println!("{}", r.report());
                match runs.iter_mut().find(|x| x.system == r.system) {
                    Some(sum) => sum.add(r),
                    None => runs.push(r),
                }
            }
        }
        rows.extend(runs);
    }

    for (system, before) in terms {
        let c = if system == "fleet" { &cluster } else { baseline.as_ref().context("the baseline cluster")? };
        let after = c.status().await?.term;
        println!("{}", json!({"system": system, "run": "elections_under_load", "terms": after - before}));
    }
    let mut failovers = Vec::new();
    let fleet = fleet_failovers(&mut cluster, args.failovers).await?;
    print_failover("fleet", &fleet);
    failovers.push(("fleet", fleet));
    drop(cluster);
    if let Some(b) = baseline.as_mut() {
        let times = fleet_failovers(b, args.failovers).await?;
        print_failover("fleet@baseline", &times);
        failovers.push(("fleet@baseline", times));
    }
    Ok((rows, failovers, floor, stages))
}

/// Unlabelled histograms.
const NO_LABELS: &[&str] = &[""];

/// The histograms that time a replicated write's stages on a coordinator
/// (`fleet-coord`'s `observe` module and its timed `Control` calls), in
/// the order a write passes them, each with the label sets summed.
const STAGES: [(&str, &str, &[&str]); 7] = [
    ("handled", "fleet_control_call_seconds", &[r#"{method="AcquireLock"}"#, r#"{method="ReleaseLock"}"#]),
    ("proposal", "fleet_raft_proposal_seconds", NO_LABELS),
    ("log_flush", "fleet_raft_log_flush_seconds", NO_LABELS),
    ("fsync", "fleet_raft_log_fsync_seconds", NO_LABELS),
    ("replicate", "fleet_raft_replicate_seconds", NO_LABELS),
    ("follower_append", "fleet_raft_follower_append_seconds", NO_LABELS),
    ("apply", "fleet_raft_apply_seconds", NO_LABELS),
];

/// Stage → (sum of seconds, count).
type Sums = std::collections::BTreeMap<&'static str, (f64, f64)>;

/// Coordinator id → its stages' sums, from each one's `/metrics`.
type StageTotals = std::collections::BTreeMap<u64, Sums>;

async fn stage_totals(cluster: &Cluster) -> anyhow::Result<StageTotals> {
    let mut out = StageTotals::new();
    for &id in cluster.coords.keys() {
        let answer = fleet_tests::https::Https::new(cluster, id, "operator")?.get("/metrics").await?;
        answer.expect(200)?;
        let value = |name: String| -> f64 {
            answer.body.lines().find_map(|l| l.strip_prefix(name.as_str())?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
        };
        let per = out.entry(id).or_default();
        for (stage, metric, labels) in STAGES {
            let total = |suffix: &str| labels.iter().map(|l| value(format!("{metric}_{suffix}{l}"))).sum::<f64>();
            per.insert(stage, (total("sum"), total("count")));
        }
    }
    Ok(out)
}

/// Where this build's writes spent their time in the runs at one client
/// count: per stage, the seconds and the number of times it ran, on the
/// leader and on the followers (summed).
#[derive(Debug, Clone)]
pub struct Stages {
    clients: usize,
    leader: Sums,
    followers: Sums,
}

impl Stages {
    fn between(clients: usize, leader: u64, before: &StageTotals, after: &StageTotals) -> Stages {
        let mut s = Stages { clients, leader: Default::default(), followers: Default::default() };
        for (id, stages) in after {
            let side = if *id == leader { &mut s.leader } else { &mut s.followers };
            for (stage, (sum, count)) in stages {
                let (sum0, count0) = before.get(id).and_then(|b| b.get(stage)).copied().unwrap_or((0.0, 0.0));
                let e = side.entry(*stage).or_default();
                e.0 += sum - sum0;
                e.1 += count - count0;
            }
        }
        s
    }

    fn add(&mut self, other: &Stages) {
        for (mine, theirs) in [(&mut self.leader, &other.leader), (&mut self.followers, &other.followers)] {
            for (stage, (sum, count)) in theirs {
                let e = mine.entry(*stage).or_default();
                e.0 += sum;
                e.1 += count;
            }
        }
    }

    /// Mean milliseconds of `stage` on `side`; `None` when it never ran.
    fn mean_ms(side: &Sums, stage: &str) -> Option<f64> {
        side.get(stage).filter(|(_, count)| *count > 0.0).map(|(sum, count)| sum / count * 1000.0)
    }

    fn report(&self) -> serde_json::Value {
        let side = |m: &Sums| -> serde_json::Value {
            m.iter()
                .map(|(stage, (_, count))| (stage.to_string(), json!({"count": count, "mean_ms": Self::mean_ms(m, stage).map(round3)})))
                .collect()
        };
        json!({"system": "fleet", "run": "write_stages", "clients": self.clients, "leader": side(&self.leader), "followers": side(&self.followers)})
    }
}

/// Where a write's time went, for this build: the client's mean against
/// the mean of each stage (see `fleet-coord`'s `observe` module).
fn print_stages(rows: &[RunResult], stages: &[Stages]) {
    if stages.is_empty() {
        return;
    }
    println!(
        "\n| clients | client mean ms | call handled (leader) | proposal (leader) | log flush (leader) | fsync (leader) | replicate (leader) | append on a follower | log flush (followers) | apply (leader) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    for s in stages {
        let client = rows
            .iter()
            .find(|r| r.system == "fleet" && r.clients == s.clients)
            .map(|r| r.lat.iter().map(Duration::as_secs_f64).sum::<f64>() / r.lat.len().max(1) as f64 * 1000.0);
        let (l, f) = (&s.leader, &s.followers);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.clients,
            ms(client),
            ms(Stages::mean_ms(l, "handled")),
            ms(Stages::mean_ms(l, "proposal")),
            ms(Stages::mean_ms(l, "log_flush")),
            ms(Stages::mean_ms(l, "fsync")),
            ms(Stages::mean_ms(l, "replicate")),
            ms(Stages::mean_ms(f, "follower_append")),
            ms(Stages::mean_ms(f, "log_flush")),
            ms(Stages::mean_ms(l, "apply")),
        );
    }
}

/// fdatasync of a small append on the disk the cluster uses, and a
/// loopback TCP round trip: what one replicated write cannot beat.
pub fn floor(dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let mut fsync = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        f.write_all(&[7u8; 128])?;
        f.sync_data()?;
        fsync.push(t.elapsed());
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        loop {
            let n = s.read(&mut b)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&b[..n])?;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut rtt = Vec::new();
    let mut b = [0u8; 64];
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&[1u8; 64])?;
        s.read_exact(&mut b)?;
        rtt.push(t.elapsed());
    }
    drop(s);
    let _ = echo.join();
    let fs50 = percentile(fsync, 0.5);
    let rtt50 = percentile(rtt, 0.5);
    Ok(
        json!({"system": "floor", "fdatasync_p50_ms": round3(fs50), "loopback_rtt_p50_ms": round3(rtt50), "floor_p50_ms": round3(fs50 + rtt50)}),
    )
}

/// `calls` calls, one after another, of an RPC that does no Raft work
/// (`ClusterStatus` answered locally) by one client connected to the
/// leader: what the client's hop to the leader and back costs without a
/// write, to set beside the write's stages.
async fn rpc_without_raft(cluster: &Cluster, calls: usize) -> anyhow::Result<serde_json::Value> {
    let leader = cluster.status().await?.leader_id;
    let mut ctx = cluster.context("operator");
    ctx.addrs = vec![cluster.coords.get(&leader).context("the leader is one of the cluster's coordinators")?.addr.clone()];
    let mut c = fleetctl::client::Client::new(&ctx)?;
    let mut lat = Vec::with_capacity(calls);
    for _ in 0..calls + 10 {
        let t = Instant::now();
        c.call(
            |mut cl, _| async move { cl.cluster_status(fleet_proto::ClusterStatusRequest { local: true }).await.map(|r| r.into_inner()) },
        )
        .await?;
        lat.push(t.elapsed());
    }
    // The first calls connect.
    let lat = lat.split_off(10);
    let mean = lat.iter().map(Duration::as_secs_f64).sum::<f64>() / lat.len().max(1) as f64 * 1000.0;
    Ok(
        json!({"system": "fleet", "run": "rpc_without_raft", "calls": lat.len(), "p50_ms": round3(percentile(lat, 0.5)), "mean_ms": round3(mean)}),
    )
}

/// Every client's latencies, sorted.
async fn join_latencies(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>>) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    lat.sort();
    Ok(lat)
}

/// `clients` clients, each with its own mTLS connection, alternating
/// `AcquireLock`/`ReleaseLock` on destination `{prefix}-{clients}-{k}` for
/// `duration`. Each ends on a release, so a later run on the same
/// destinations starts unlocked.
pub async fn fleet_run(cluster: &Cluster, prefix: &str, clients: usize, duration: Duration) -> anyhow::Result<RunResult> {
    // Request ids are idempotency keys: unique per run, or a repeated run
    // would get the first run's answers back without writing anything.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for k in 0..clients {
        let mut c = cluster.client("operator")?;
        let dest = format!("{prefix}-{clients}-{k}");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline || !i.is_multiple_of(2) {
                let t = Instant::now();
                if i.is_multiple_of(2) {
                    acquire(&mut c, &dest, "bench", &format!("{dest}-{run}-{i}")).await?;
                } else {
                    release(&mut c, &dest, &format!("{dest}-{run}-{i}")).await?;
                }
                lat.push(t.elapsed());
                i += 1;
            }
            anyhow::Ok(lat)
        }));
    }
    let lat = join_latencies(tasks).await?;
    Ok(RunResult { system: "fleet", clients, ops: lat.len(), secs: start.elapsed().as_secs_f64(), lat })
}

/// `count` times: kill -9 the leader and time the first acknowledged write
/// after it; then restart the killed coordinator and wait until it has
/// applied what the new leader committed.
async fn fleet_failovers(cluster: &mut Cluster, count: usize) -> anyhow::Result<Vec<Duration>> {
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let mut c = cluster.client("operator")?;
    let mut times = Vec::new();
    for k in 0..count {
        acquire(&mut c, "failover", "x", &format!("warm-{run}-{k}")).await?;
        let leader = cluster.status().await?.leader_id;
        let t = Instant::now();
        cluster.kill9(leader)?;
        acquire(&mut c, "failover", "x", &format!("after-{run}-{k}")).await?;
        times.push(t.elapsed());
        cluster.restart(leader)?;
        let target = cluster.status().await?.commit_index;
        let cluster = &*cluster;
        eventually(&format!("coordinator {leader} to catch up after its restart"), Duration::from_secs(60), || async move {
            Ok(cluster.local_status(leader).await.ok().filter(|s| s.applied_index >= target).map(|_| ()))
        })
        .await?;
    }
    Ok(times)
}

fn start_etcd(script: &str) -> anyhow::Result<(std::process::Child, Vec<String>)> {
    let mut child = Command::new("bash")
        .arg(script)
        .arg("--serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {script}"))?;
    let mut out = child.stdout.take().context("etcd script stdout")?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = out.read(&mut byte)?;
        if n == 0 {
            bail!("{script} ended before printing ETCD_ENDPOINTS");
        }
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&buf).to_string();
            if let Some(eps) = line.strip_prefix("ETCD_ENDPOINTS=") {
                return Ok((child, eps.split(',').map(str::to_string).collect()));
            }
            buf.clear();
        } else {
            buf.push(byte[0]);
        }
    }
}

async fn etcd_leader(endpoints: &[String]) -> anyhow::Result<String> {
    for ep in endpoints {
        let Ok(mut c) = etcd_client::Client::connect([ep.as_str()], None).await else { continue };
        let Ok(s) = c.status().await else { continue };
        let me = s.header().map(|h| h.member_id()).unwrap_or(0);
        if me == s.leader() {
            return Ok(ep.clone());
        }
    }
    bail!("no etcd leader found among {endpoints:?}")
}

async fn etcd_run(endpoints: &[String], clients: usize, duration: Duration) -> anyhow::Result<RunResult> {
    let leader = etcd_leader(endpoints).await?;
    let client = etcd_client::Client::connect([leader.as_str()], None).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for k in 0..clients {
        let mut kv = client.kv_client();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                kv.put(format!("lock/dest-{k}"), format!("holder-{i}"), None).await?;
                lat.push(t.elapsed());
                i += 1;
            }
            anyhow::Ok(lat)
        }));
    }
    let lat = join_latencies(tasks).await?;
    Ok(RunResult { system: "etcd-3.4", clients, ops: lat.len(), secs: start.elapsed().as_secs_f64(), lat })
}

/// kill -9 etcd's leader and time the first acknowledged write through a
/// survivor.
async fn etcd_failover_run(endpoints: &[String]) -> anyhow::Result<Duration> {
    let leader = etcd_leader(endpoints).await?;
    let port = leader.rsplit(':').next().context("endpoint port")?;
    let pids = Command::new("pgrep").arg("-f").arg(format!("listen-client-urls http://127.0.0.1:{port} ")).output()?;
    let pid = String::from_utf8_lossy(&pids.stdout).lines().next().context("etcd leader pid")?.trim().to_string();
    let survivor = endpoints.iter().find(|e| **e != leader).context("a surviving endpoint")?.clone();
    let t = Instant::now();
    Command::new("kill").arg("-9").arg(&pid).status()?;
    loop {
        let opts =
            etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(300)).with_connect_timeout(Duration::from_millis(300));
        if let Ok(mut c) = etcd_client::Client::connect([survivor.as_str()], Some(opts)).await {
            if c.put("failover", "ok", None).await.is_ok() {
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("etcd did not accept a write within 30 s of losing its leader");
        }
    }
}
