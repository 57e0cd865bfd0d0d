//! `fleet-node`: the worker agent. See `fleet-node --help`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{CommandFactory, Parser};
use fleet_node::adapter::{Adapter, Adapters};
use fleet_node::agent::Agent;
use fleet_node::command::{CommandAdapter, CommandConfig};
use fleet_node::connection::Connector;
use fleet_node::docker::{DockerAdapter, DockerConfig};
use fleet_node::fencing::Fencing;
use fleet_node::identity::NodeIdentity;
use fleet_node::process::ports::{self, PortRange};
use fleet_node::process::{ProcessAdapter, ProcessConfig};
use fleet_node::witness::Witness;

/// Fleet's worker agent: runs the deployment steps the coordinators assign.
///
/// fleet-node keeps one mutually authenticated gRPC stream open to the Raft
/// leader of the coordinators (any coordinator redirects it there). Its id
/// is the common name of its certificate (role `node`, from
/// `fleetctl certs issue node NAME`); destinations select nodes by their
/// labels.
///
/// Steps run through the built-in adapters. `process`: each release of an
/// app runs as a supervised local process, blue-green, behind a TCP route
/// on a stable 127.0.0.1 port. `command`: shell commands (`sh -c`), for the
/// steps of `command` destinations and for pre/post hooks. `docker`: each
/// release runs as a container on this host's Docker Engine, blue-green
/// behind the same kind of route (the engine is reached on first use:
/// --docker-socket, else DOCKER_HOST, else /var/run/docker.sock). State lives in --data-dir: a restarted fleet-node
/// adopts the instances that still run and listens on the same route ports.
/// Programs beside the fleet-node executable (such as `fleet-demo-app`) are
/// found on PATH.
///
/// Example:
///   fleet-node --coord 127.0.0.1:7001,127.0.0.1:7002 \
///       --ca certs/ca.pem --cert certs/node-1.pem --key certs/node-1-key.pem \
///       --label env=staging --data-dir /var/lib/fleet-node
#[derive(Parser, Debug)]
#[command(name = "fleet-node", version, verbatim_doc_comment)]
struct Args {
    /// Coordinator addresses, HOST:PORT (comma-separated or repeated). Any
    /// one is enough; the node follows redirects to the leader.
    #[arg(long = "coord", env = "FLEET_ADDR", value_name = "ADDR", value_delimiter = ',', required = true, value_parser = parse_addr)]
    coord: Vec<String>,

    /// The cluster CA certificate (PEM), e.g. ca.pem from `fleetctl certs init`.
    #[arg(long, env = "FLEET_NODE_CA", value_name = "FILE")]
    ca: PathBuf,

    /// This node's certificate (PEM, role `node`); its common name is the node id.
    #[arg(long, env = "FLEET_NODE_CERT", value_name = "FILE")]
    cert: PathBuf,

    /// The key of --cert (PEM).
    #[arg(long, env = "FLEET_NODE_KEY", value_name = "FILE")]
    key: PathBuf,

    /// A label KEY=VALUE that destinations select nodes by (repeatable;
    /// comma-separated in the environment variable).
    #[arg(long = "label", env = "FLEET_NODE_LABEL", value_name = "KEY=VALUE", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,

    /// Where the node keeps its state (app instances, route ports, fencing
    /// tokens, instance logs). Created if missing. One fleet-node per dir.
    #[arg(long, env = "FLEET_NODE_DATA_DIR", value_name = "DIR")]
    data_dir: PathBuf,

    /// Append one JSON line per finished step action to FILE (node,
    /// destination, deployment, step, undo, attempt, token, action,
    /// start_ms, end_ms, ok). For tests and audits.
    #[arg(long, env = "FLEET_NODE_WITNESS", value_name = "FILE")]
    witness: Option<PathBuf>,

    /// Log level or filter for the log on stderr: error, warn, info, debug,
    /// trace, or a filter such as `fleet_node=debug,info`.
    #[arg(long, env = "FLEET_NODE_LOG_LEVEL", value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    log_level: String,

    /// Log format on stderr: `text`, or `json` (one JSON object per line).
    #[arg(long, env = "FLEET_NODE_LOG_FORMAT", value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// The Docker Engine's unix socket, for `docker` destinations (default:
    /// DOCKER_HOST, else /var/run/docker.sock). The node connects on its
    /// first docker step; a missing or refused socket fails that step with
    /// a message naming the socket.
    #[arg(long, env = "FLEET_NODE_DOCKER_SOCKET", value_name = "PATH")]
    docker_socket: Option<PathBuf>,

    /// The ports new app instances listen on, FIRST-LAST. Keep it outside
    /// the kernel's ephemeral range (Linux: `sysctl
    /// net.ipv4.ip_local_port_range`, usually 32768-60999), or the node's
    /// own outgoing connections can hold a port an instance is about to use.
    #[arg(long, env = "FLEET_NODE_INSTANCE_PORTS", value_name = "FIRST-LAST", default_value_t = PortRange::DEFAULT)]
    instance_ports: PortRange,

    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP: steps
    /// by adapter and outcome, their durations, steps running, stale tokens
    /// refused, leader connection). Off unless given; e.g. 127.0.0.1:9101.
    #[arg(long, env = "FLEET_NODE_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,

    /// Write the metrics endpoint's bound address here (useful with port 0).
    #[arg(long, value_name = "FILE", requires = "metrics_addr")]
    metrics_addr_file: Option<PathBuf>,
}

fn parse_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("`{s}` is not HOST:PORT"))?;
    if host.trim_matches(['[', ']']).is_empty() {
        return Err(format!("`{s}` has no host; write it like 127.0.0.1:7001"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("`{port}` in `{s}` is not a port (1-65535)")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    fleet_core::manifest::validate_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

fn parse_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}` is not a log level or filter ({e}); use error, warn, info, debug or trace"))
}

/// Report a bad flag value the way clap does (exit 2).
fn usage(msg: impl std::fmt::Display) -> ! {
    Args::command().error(clap::error::ErrorKind::ValueValidation, msg).exit()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::new(&args.log_level);
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_current_span(true).with_writer(std::io::stderr).with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let identity = match NodeIdentity::load(&args.ca, &args.cert, &args.key) {
        Ok(i) => i,
        Err(e) => usage(e),
    };
    if let Err(e) = std::fs::create_dir_all(&args.data_dir) {
        usage(format_args!("--data-dir {}: cannot create it: {e}", args.data_dir.display()));
    }
    let witness = args.witness.as_ref().map(|p| match Witness::open(p) {
        Ok(w) => w,
        Err(e) => usage(format_args!("--witness {}: cannot open for appending: {e}", p.display())),
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, identity, witness)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Hold an exclusive lock on `<data-dir>/fleet-node.lock` for the life of
/// the process: two nodes on one data dir would fight over its instances.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    let path = dir.join("fleet-node.lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::bail!(
            "the data dir {} is in use by another fleet-node (pid {}); stop it or give this one its own --data-dir",
            dir.display(),
            holder.trim()
        );
    }
    f.set_len(0).and_then(|_| write!(f, "{}", std::process::id())).with_context(|| format!("writing {}", path.display()))?;
    Ok(f)
}

async fn run(args: Args, identity: NodeIdentity, witness: Option<Witness>) -> anyhow::Result<()> {
    let node = identity.node_id.clone();
    for addr in &args.coord {
        if let Err(e) = identity.channel(addr) {
            usage(e);
        }
    }
    let _lock = lock_data_dir(&args.data_dir)?;
    if let Some(addr) = args.metrics_addr {
        let bound = fleet_node::metrics::serve(addr).await?;
        if let Some(path) = &args.metrics_addr_file {
            std::fs::write(path, bound.to_string()).with_context(|| format!("--metrics-addr-file {}", path.display()))?;
        }
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    if let Some(eph) = ports::ephemeral_range().filter(|e| e.overlaps(args.instance_ports)) {
        tracing::warn!(
            instance_ports = %args.instance_ports, ephemeral = %eph,
            "--instance-ports overlaps the kernel's ephemeral port range: an outgoing connection can hold a port an instance is about to use (its start is then retried on another port); choose a range outside {eph}"
        );
    }
    let process_cfg = ProcessConfig { instance_ports: args.instance_ports, ..ProcessConfig::new(&args.data_dir) };
    let adapter = ProcessAdapter::open(process_cfg).await.context("opening the process adapter's state")?;
    let fencing = Fencing::open(&args.data_dir)?;
    let adopted = adapter.instances().len();
    let journal = Some(args.data_dir.join("results.json"));
    let process: Arc<dyn Adapter> = Arc::new(adapter.clone());
    let command: Arc<dyn Adapter> = Arc::new(CommandAdapter::new(CommandConfig::new(&args.data_dir)));
    let docker_adapter =
        DockerAdapter::open(DockerConfig { socket: args.docker_socket.clone(), node: node.clone(), ..DockerConfig::new(&args.data_dir) })
            .context("opening the docker adapter's state")?;
    let docker: Arc<dyn Adapter> = Arc::new(docker_adapter.clone());
    let (agent, results) = Agent::new(node.clone(), Adapters::new([process, command, docker]), fencing, witness, journal);
    let labels: BTreeMap<String, String> = args.labels.into_iter().collect();
    let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "fleet-node {node} starting: data dir {}, labels [{}], {adopted} app instance(s) adopted, coordinators {}",
        args.data_dir.display(),
        shown.join(","),
        args.coord.join(",")
    );
    let connector = Connector { identity, addrs: args.coord, labels, agent, print: true };
    tokio::select! {
        _ = connector.run(results) => {}
        _ = shutdown_signal() => {}
    }
    let running = adapter.instances().len();
    adapter.shutdown().await;
    docker_adapter.shutdown().await;
    println!(
        "fleet-node {node} stopped; {running} app instance(s) keep running and are adopted when fleet-node starts again on {}",
        args.data_dir.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
