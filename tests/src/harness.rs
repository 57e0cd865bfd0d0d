//! A real cluster of `fleet-coord` processes on 127.0.0.1 with OS-assigned
//! ports, driven through the same client code `fleetctl` uses. Waits poll
//! a condition with a deadline; nothing sleeps a fixed time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fleet_core::deploy::Deployment;
use fleet_core::witness::WitnessLine;
use fleet_proto::*;
use fleetctl::client::{Client, Context};
use fleetctl::dev::{self, CoordSpec};
use serde::de::DeserializeOwned;

use crate::json::{ClusterStatusView, Line, NodeRecord, ResultLine};

/// Start-up and election settings for tests: fast, but with headroom for a
/// loaded 2-core CI machine.
pub const FAST_RAFT: &[&str] = &["--heartbeat-ms", "50", "--election-timeout-ms", "300"];

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct Coord {
    pub spec: CoordSpec,
    pub child: Option<Child>,
    pub addr: String,
    /// The command prefix it runs under (`ip netns exec NS`, see the
    /// `netns` module); empty = directly.
    pub wrap: Vec<std::ffi::OsString>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub ctl: PathBuf,
    pub coords: BTreeMap<u64, Coord>,
    pub extra_args: Vec<String>,
}

impl Cluster {
    /// Certificates plus `n` coordinators joined as voters.
    pub async fn start(n: u64, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        Self::start_with(dev::find_binary("fleet-coord")?, n, extra_args).await
    }

    /// [`Cluster::start`] with the coordinator binary `bin` (a benchmark
    /// compares an earlier build with this one in the same run).
    pub async fn start_with(bin: PathBuf, n: u64, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        install_crypto();
        // FLEET_KEEP_TEST_DIR=1 keeps logs and data of a failed run for a post-mortem.
        let keep = std::env::var_os("FLEET_KEEP_TEST_DIR").is_some();
        let dir = tempfile::Builder::new().prefix("fleet-test-").disable_cleanup(keep).tempdir()?;
        fleetctl::certs::init(&dir.path().join("certs"), false)?;
        let mut cluster = Cluster {
            bin,
            ctl: dev::find_binary("fleetctl")?,
            dir,
            coords: BTreeMap::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        cluster.spawn(1, true, "127.0.0.1:0")?;
        let mut c = cluster.client("operator")?;
        for id in 2..=n {
            cluster.spawn(id, false, "127.0.0.1:0")?;
            let addr = cluster.coords[&id].addr.clone();
            c.call_with_timeout(Duration::from_secs(120), |mut cl, _| {
                let req = AddLearnerRequest { id, addr: addr.clone() };
                async move { cl.add_learner(req).await.map(|r| r.into_inner()) }
            })
            .await?;
            c.call(|mut cl, _| async move { cl.promote(PromoteRequest { id }).await.map(|r| r.into_inner()) }).await?;
        }
        Ok(cluster)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start coordinator `id` (again) listening on `listen`.
    /// Every coordinator serves its HTTP API too (address in
    /// `coord-N.http`, see [`Cluster::http_addr`]), on the same port again
    /// after a restart.
    pub fn spawn(&mut self, id: u64, bootstrap: bool, listen: &str) -> anyhow::Result<()> {
        let wrap = self.coords.get(&id).map(|c| c.wrap.clone()).unwrap_or_default();
        self.spawn_under(wrap, id, bootstrap, listen)
    }

    /// [`Cluster::spawn`] under a command prefix (`ip netns exec NS`); a
    /// restart runs it under the same prefix again.
    pub fn spawn_under(&mut self, wrap: Vec<std::ffi::OsString>, id: u64, bootstrap: bool, listen: &str) -> anyhow::Result<()> {
        let http_file = self.http_file(id);
        let http_listen = std::fs::read_to_string(&http_file).map(|a| a.trim().to_string()).unwrap_or_else(|_| "127.0.0.1:0".into());
        let _ = std::fs::remove_file(&http_file);
        let mut extra_args = self.extra_args.clone();
        extra_args.extend(["--http-addr".into(), http_listen, "--http-addr-file".into(), http_file.display().to_string()]);
        let spec = CoordSpec { id, dir: self.dir.path().to_path_buf(), bootstrap, listen: listen.to_string(), extra_args };
        let (child, addr) = dev::spawn_coordinator_under(&wrap, &self.bin, &spec, Duration::from_secs(30))?;
        self.coords.insert(id, Coord { spec, child: Some(child), addr, wrap });
        Ok(())
    }

    fn http_file(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("coord-{id}.http"))
    }

    /// Coordinator `id`'s HTTPS API address (HOST:PORT). The file is
    /// written before the gRPC address file `spawn` waits for.
    pub fn http_addr(&self, id: u64) -> anyhow::Result<String> {
        let path = self.http_file(id);
        let addr =
            std::fs::read_to_string(&path).with_context(|| format!("coordinator {id} wrote no HTTP address to {}", path.display()))?;
        Ok(addr.trim().to_string())
    }

    /// Every coordinator address, in id order.
    pub fn addrs(&self) -> Vec<String> {
        self.coords.values().map(|c| c.addr.clone()).collect()
    }

    pub fn context(&self, cert: &str) -> Context {
        let certs = self.dir.path().join("certs");
        Context {
            addrs: self.addrs(),
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("{cert}.pem")),
            key: certs.join(format!("{cert}-key.pem")),
        }
    }

    pub fn client(&self, cert: &str) -> anyhow::Result<Client> {
        let mut c = Client::new(&self.context(cert))?;
        c.retry_for = Duration::from_secs(30);
        Ok(c)
    }

    /// Run the real `fleetctl` binary with this cluster's context.
    pub fn fleetctl(&self, cert: &str, args: &[&str]) -> anyhow::Result<Output> {
        let ctx_path = self.dir.path().join(format!("context-{cert}.json"));
        self.context(cert).save(&ctx_path)?;
        Command::new(&self.ctl)
            .args(args)
            .env("FLEET_CONTEXT", &ctx_path)
            .env_remove("FLEET_ADDR")
            .env_remove("FLEET_CA")
            .env_remove("FLEET_CERT")
            .env_remove("FLEET_KEY")
            .output()
            .context("running fleetctl")
    }

    /// `kill -9` one coordinator.
    pub fn kill9(&mut self, id: u64) -> anyhow::Result<()> {
        let coord = self.coords.get_mut(&id).context("no such coordinator")?;
        if let Some(mut child) = coord.child.take() {
            child.kill()?; // SIGKILL
            child.wait()?;
        }
        Ok(())
    }

    /// Restart a killed coordinator on the address the others know.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let addr = self.coords[&id].addr.clone();
        self.spawn(id, false, &addr)
    }

    /// Cluster status as answered by the leader (following redirects).
    pub async fn status(&self) -> anyhow::Result<ClusterStatusReply> {
        let mut c = self.client("operator")?;
        c.call(|mut cl, _| async move { cl.cluster_status(ClusterStatusRequest { local: false }).await.map(|r| r.into_inner()) }).await
    }

    /// One coordinator's own view.
    pub async fn local_status(&self, id: u64) -> anyhow::Result<ClusterStatusReply> {
        let mut ctx = self.context("operator");
        ctx.addrs = vec![self.coords[&id].addr.clone()];
        let mut c = Client::new(&ctx)?;
        c.retry_for = Duration::from_secs(5);
        c.call(|mut cl, _| async move { cl.cluster_status(ClusterStatusRequest { local: true }).await.map(|r| r.into_inner()) }).await
    }

    /// Set coordinator `id`'s disk failpoints (`NAME=ACTIONS` lines, see
    /// `fleet-coord`'s `faults` module; `""` clears them) and wait until it
    /// has applied them. A coordinator that is not running reads them when
    /// it starts.
    pub async fn set_failpoints(&self, id: u64, text: &str) -> anyhow::Result<()> {
        let coord = self.coords.get(&id).context("no such coordinator")?;
        let dir = coord.spec.data_dir();
        std::fs::write(dir.join("failpoints"), text).with_context(|| format!("writing coordinator {id}'s failpoints"))?;
        if coord.child.is_none() {
            return Ok(());
        }
        let applied = dir.join("failpoints.applied");
        eventually(&format!("coordinator {id} to apply its failpoints"), Duration::from_secs(10), || async {
            Ok((std::fs::read_to_string(&applied).ok().as_deref() == Some(text)).then_some(()))
        })
        .await
    }

    pub fn log_of(&self, id: u64) -> String {
        dev::tail_of(&self.coords[&id].spec.log_file(), 40)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.coords.values_mut() {
            if let Some(mut child) = c.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Poll `f` until it returns `Some`, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Acquire through a client with a given request id (so a test can retry
/// the exact same logical operation).
pub async fn acquire(c: &mut Client, dest: &str, reason: &str, request_id: &str) -> anyhow::Result<LockReply> {
    c.call(|mut cl, _| {
        let req = AcquireLockRequest { destination: dest.into(), reason: reason.into(), wait_ms: 0, request_id: request_id.into() };
        async move { cl.acquire_lock(req).await.map(|r| r.into_inner()) }
    })
    .await
}

pub async fn release(c: &mut Client, dest: &str, request_id: &str) -> anyhow::Result<LockReply> {
    c.call(|mut cl, _| {
        let req = ReleaseLockRequest { destination: dest.into(), request_id: request_id.into() };
        async move { cl.release_lock(req).await.map(|r| r.into_inner()) }
    })
    .await
}

pub async fn lock_status(c: &mut Client, dest: &str) -> anyhow::Result<LockStatusReply> {
    c.call(|mut cl, _| {
        let req = LockStatusRequest { destination: dest.into() };
        async move { cl.lock_status(req).await.map(|r| r.into_inner()) }
    })
    .await
}

// ------------------------------------------------------------ deployments
//
// Worker nodes (`fleet-node`), `fleetctl` deployment commands run as real
// processes, the demo app's HTTP endpoint, the witness files and the
// processes a node left behind.

/// Environment variable every `fleet-node` started by the harness carries
/// (its value is the node's directory). Children inherit it, so the harness
/// can find (and on drop, kill) every process a node started, even ones
/// that outlive the node.
pub const OWNER_ENV: &str = "FLEET_TEST_OWNER";

/// One `fleetctl` run.
#[derive(Debug, Clone)]
pub struct CtlRun {
    pub args: Vec<String>,
    /// Exit code (`-1` when killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CtlRun {
    /// The lines `deploy`, `watch` or `rollback` printed with `-o json`,
    /// typed. A line that is not one of fleetctl's JSON lines is an error.
    pub fn lines(&self) -> anyhow::Result<Vec<Line>> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("stdout line `{l}` is not a fleetctl JSON line, in {self}")))
            .collect()
    }

    /// The `{"type":"result",...}` line of `deploy`, `watch` or `rollback`.
    pub fn result(&self) -> anyhow::Result<ResultLine> {
        self.lines()?
            .into_iter()
            .rev()
            .find_map(|l| match l {
                Line::Result(r) => Some(*r),
                _ => None,
            })
            .with_context(|| format!("no result line in the output of {self}"))
    }

    /// The full Deployment of the result line.
    pub fn deployment(&self) -> anyhow::Result<Deployment> {
        Ok(self.result()?.deployment)
    }

    /// The deployment id from a result or `submitted` line.
    pub fn id(&self) -> anyhow::Result<String> {
        self.lines()?
            .into_iter()
            .rev()
            .find_map(|l| match l {
                Line::Result(r) => Some(r.id),
                Line::Submitted(s) => Some(s.id),
                _ => None,
            })
            .with_context(|| format!("no deployment id in the output of {self}"))
    }

    /// The only JSON document printed (`status`, `list`, `history` ...), as `T`.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("stdout is not one JSON document of type {}: {self}", std::any::type_name::<T>()))
    }

    /// stdout and stderr together (error messages may be on either).
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Fail unless the exit code is `want`.
    pub fn expect_code(&self, want: i32) -> anyhow::Result<&Self> {
        anyhow::ensure!(self.code == want, "expected exit code {want}, got {self}");
        Ok(self)
    }
}

impl std::fmt::Display for CtlRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let clip = |s: &str| {
            let n = s.chars().count();
            if n > 6000 {
                format!("…{}", s.chars().skip(n - 6000).collect::<String>())
            } else {
                s.to_string()
            }
        };
        write!(
            f,
            "`fleetctl {}` exited {} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args.join(" "),
            self.code,
            self.elapsed,
            clip(&self.stdout),
            clip(&self.stderr)
        )
    }
}

/// A `fleet-node` process with its own certificate, data dir, witness file
/// and log. Killed on drop, together with every process it started.
pub struct Node {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub witness_file: PathBuf,
    pub log_file: PathBuf,
    pub child: Option<Child>,
    args: Vec<std::ffi::OsString>,
    path_env: std::ffi::OsString,
    /// A command the node runs under (`ip netns exec NS`, see
    /// the `netns` module); empty = the node's binary directly.
    wrap: Vec<std::ffi::OsString>,
}

impl Node {
    fn spawn(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_file)?;
        let mut cmd = match self.wrap.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(&self.args)
            .env(OWNER_ENV, &self.dir)
            .env("PATH", &self.path_env)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Where the node serves `/metrics` (plain HTTP), once it listens.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        std::fs::read_to_string(self.dir.join("metrics.addr")).ok()?.trim().parse().ok()
    }

    /// `kill -9` the node process (its instances stay, as after a crash).
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Start the node again (same certificate, labels and data dir).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "node {} is still running", self.name);
        self.spawn(&dev::find_binary("fleet-node")?)
    }

    /// Has the node process exited? (Then its log says why.)
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        dev::tail_of(&self.log_file, lines)
    }

    /// Every witness line written so far (a line still being written is
    /// left out; a line that is not a witness record is an error).
    pub fn witness(&self) -> anyhow::Result<Vec<WitnessLine>> {
        read_witness(&self.witness_file).with_context(|| format!("the witness of node {}", self.name))
    }

    /// Processes this node started that are still alive (pid, command
    /// line), the node itself excluded.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let me = self.pid();
        owned_processes(&self.dir).into_iter().filter(|(pid, _)| Some(*pid) != me).collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The node's instances run in their own process groups and outlive
        // it by design; the test must not leave them behind.
        for (pid, _) in owned_processes(&self.dir) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).stderr(std::process::Stdio::null()).status();
        }
    }
}

/// Witness lines of a file (none when it does not exist yet). A last line
/// still being written is left out; any other line that is not a witness
/// record is an error, never skipped.
pub fn read_witness(path: &Path) -> anyhow::Result<Vec<WitnessLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    fleet_core::witness::parse(&text).with_context(|| format!("reading {}", path.display()))
}

/// Live (not zombie) processes whose environment carries `OWNER_ENV=dir`
/// or whose working directory is inside `dir`.
pub fn owned_processes(dir: &Path) -> Vec<(u32, String)> {
    let marker = format!("{OWNER_ENV}={}", dir.display());
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || !pid_alive(pid) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let by_env = env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes());
        let by_cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).map(|p| p.starts_with(dir)).unwrap_or(false);
        if by_env || by_cwd {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ").trim().to_string();
            out.push((pid, cmd));
        }
    }
    out
}

/// Does `/proc/<pid>` exist as a live (not zombie) process?
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
            state.as_deref() != Some("Z")
        }
    }
}

/// Does `/proc/<pid>` exist at all (a zombie included)?
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Is a TCP connection to 127.0.0.1:`port` refused?
pub async fn port_refused(port: u16) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(("127.0.0.1", port))).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// `GET /` (or `path`) over a fresh connection with `Connection: close`;
/// the body of a 200 answer, else an error. Bounded by `timeout`.
pub async fn http_get_path(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.context("sending the request")?;
        // Read to the end, or to Content-Length: some servers (chromedriver)
        // keep the connection open despite `Connection: close`.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await.context("reading the answer")?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|len| buf.len() >= end + 4 + len) {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("no HTTP answer from {addr}: {text:?}"))?;
        let status = head.lines().next().unwrap_or("");
        anyhow::ensure!(status.split_whitespace().nth(1) == Some("200"), "{addr} answered `{status}`");
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
        anyhow::Ok(body)
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| anyhow::anyhow!("no answer from {addr} within {timeout:?}"))?
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET /` with a 2 s timeout.
pub async fn http_get(addr: &str) -> anyhow::Result<String> {
    http_get_path(addr, "/", Duration::from_secs(2)).await
}

/// The release the demo app names in its answer to `GET /`.
pub fn release_of(body: &str) -> Option<String> {
    body.trim().strip_prefix("fleet demo app, release ").map(|r| r.trim().to_string())
}

impl Cluster {
    /// Issue a node certificate named `name` and start `fleet-node` with
    /// `labels`; its data dir, witness file and log live in `nodes/<name>/`.
    pub fn start_node(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<Node> {
        self.start_node_wrapped(name, labels, &[])
    }

    /// [`Cluster::start_node`] with the node run under `wrap` (a command
    /// prefix such as `ip netns exec NS`; it must exec the node, so the
    /// child's pid is the node's).
    pub fn start_node_wrapped(&self, name: &str, labels: &[(&str, &str)], wrap: &[std::ffi::OsString]) -> anyhow::Result<Node> {
        self.start_node_full(name, labels, wrap, &self.addrs())
    }

    /// [`Cluster::start_node`] with the node told to reach the coordinators
    /// at `coords` (a proxy in front of them, say) instead of their own
    /// addresses.
    pub fn start_node_via(&self, name: &str, labels: &[(&str, &str)], coords: &[String]) -> anyhow::Result<Node> {
        self.start_node_full(name, labels, &[], coords)
    }

    fn start_node_full(&self, name: &str, labels: &[(&str, &str)], wrap: &[std::ffi::OsString], coords: &[String]) -> anyhow::Result<Node> {
        let certs = self.path().join("certs");
        fleetctl::certs::issue(&certs, fleet_core::auth::Role::Node, name, &[], &certs)?;
        let bin = dev::find_binary("fleet-node")?;
        let dir = self.path().join("nodes").join(name);
        std::fs::create_dir_all(dir.join("data"))?;
        // The node finds `fleet-demo-app` (and any sibling binary) on PATH.
        let mut path_dirs: Vec<PathBuf> = vec![];
        if let Ok(app) = dev::find_binary("fleet-demo-app") {
            path_dirs.extend(app.parent().map(Path::to_path_buf));
        }
        path_dirs.extend(bin.parent().map(Path::to_path_buf));
        let current = std::env::var_os("PATH").unwrap_or_default();
        path_dirs.extend(std::env::split_paths(&current));
        let path_env = std::env::join_paths(path_dirs)?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "--coord".into(),
            coords.join(",").into(),
            "--ca".into(),
            certs.join("ca.pem").into(),
            "--cert".into(),
            certs.join(format!("{name}.pem")).into(),
            "--key".into(),
            certs.join(format!("{name}-key.pem")).into(),
            "--data-dir".into(),
            dir.join("data").into(),
            "--witness".into(),
            dir.join("witness.jsonl").into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr-file".into(),
            dir.join("metrics.addr").into(),
        ];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}").into());
        }
        let mut node = Node {
            name: name.to_string(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            witness_file: dir.join("witness.jsonl"),
            log_file: dir.join("node.log"),
            data_dir: dir.join("data"),
            dir,
            child: None,
            args,
            path_env,
            wrap: wrap.to_vec(),
        };
        node.spawn(&bin)?;
        Ok(node)
    }

    /// Path of a context file for `cert`, written atomically (concurrent
    /// fleetctl runs never read a half-written one).
    pub fn context_file(&self, cert: &str) -> anyhow::Result<PathBuf> {
        let path = self.path().join(format!("context-{cert}.json"));
        let tmp = self.path().join(format!(".context-{cert}-{}.json", rand::random::<u64>()));
        self.context(cert).save(&tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Run the real `fleetctl` binary as `cert`, without blocking the runtime.
    pub async fn ctl_as(&self, cert: &str, args: &[&str]) -> anyhow::Result<CtlRun> {
        let ctx = self.context_file(cert)?;
        run_fleetctl(&self.ctl, &ctx, self.path(), args.iter().map(|s| s.to_string()).collect()).await
    }

    /// `fleetctl` as the operator.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<CtlRun> {
        self.ctl_as("operator", args).await
    }

    /// Write `text` to a file in the test dir and return its path.
    pub fn write_file(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// `fleetctl destinations apply -f FILE`; must succeed.
    pub async fn apply_destinations(&self, yaml: &str) -> anyhow::Result<CtlRun> {
        let f = self.write_file(&format!("destinations-{}.yaml", rand::random::<u32>()), yaml)?;
        let run = self.ctl(&["destinations", "apply", "-f", f.to_str().unwrap(), "-o", "json"]).await?;
        run.expect_code(0)?;
        Ok(run)
    }

    /// `fleetctl nodes -o json`.
    pub async fn nodes_json(&self) -> anyhow::Result<Vec<NodeRecord>> {
        let run = self.ctl(&["nodes", "-o", "json"]).await?;
        run.expect_code(0)?;
        run.json()
    }

    /// Wait until the nodes named are registered and connected.
    pub async fn wait_nodes_connected(&self, names: &[&str]) -> anyhow::Result<Vec<NodeRecord>> {
        eventually(&format!("nodes {names:?} to connect"), Duration::from_secs(30), || async {
            let nodes = self.nodes_json().await?;
            let connected = |n: &&str| nodes.iter().any(|v| v.id == *n && v.connected);
            if names.iter().all(connected) {
                Ok(Some(nodes))
            } else {
                anyhow::bail!("nodes: {nodes:?}")
            }
        })
        .await
    }

    /// `fleetctl deploy -f <manifest> ARGS -o json`.
    pub async fn deploy(&self, manifest: &Path, args: &[&str]) -> anyhow::Result<CtlRun> {
        let mut all = vec!["deploy", "-f", manifest.to_str().context("manifest path is not UTF-8")?];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        self.ctl(&all).await
    }

    /// `fleetctl status ID -o json`: the Deployment.
    pub async fn deployment(&self, id: &str) -> anyhow::Result<Deployment> {
        let run = self.ctl(&["status", id, "-o", "json"]).await?;
        run.expect_code(0)?;
        run.json()
    }

    /// The last lines of every coordinator log.
    pub fn coord_logs(&self, lines: usize) -> String {
        self.coords
            .iter()
            .map(|(id, c)| format!("=== coordinator {id} ({}):\n{}", c.spec.log_file().display(), dev::tail_of(&c.spec.log_file(), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A cluster with worker nodes: what every deployment test starts from.
/// On a failed test it prints the tail of every log.
pub struct Fleet {
    /// Dropped after `cluster` (fields drop in order): nodes go first.
    pub nodes: Vec<Node>,
    pub cluster: Cluster,
    reported: bool,
    _slot: TestSlot,
}

impl Fleet {
    /// A fleet of a cluster and nodes started elsewhere (by the `netns` module,
    /// in network namespaces), holding `slot` for its lifetime.
    pub fn assemble(slot: TestSlot, cluster: Cluster, nodes: Vec<Node>) -> Fleet {
        Fleet { nodes, cluster, reported: false, _slot: slot }
    }

    /// 3 coordinators, then one node per `(name, labels)`, then
    /// `destinations_yaml`; returns when every node is connected.
    pub async fn start(nodes: &[(&str, &[(&str, &str)])], destinations_yaml: &str) -> anyhow::Result<Fleet> {
        Fleet::start_with(FAST_RAFT, nodes, destinations_yaml).await
    }

    /// [`Fleet::start`] with these coordinator flags (instead of [`FAST_RAFT`]).
    pub async fn start_with(coord_args: &[&str], nodes: &[(&str, &[(&str, &str)])], destinations_yaml: &str) -> anyhow::Result<Fleet> {
        let slot = TestSlot::take();
        let cluster = Cluster::start(3, coord_args).await?;
        let mut fleet = Fleet { nodes: vec![], cluster, reported: false, _slot: slot };
        for (name, labels) in nodes {
            let node = fleet.cluster.start_node(name, labels)?;
            fleet.nodes.push(node);
        }
        let names: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
        let connected = fleet.cluster.wait_nodes_connected(&names).await.and_then(|listed| {
            // `fleetctl nodes` shows each node with the labels it was started with.
            for (name, labels) in nodes {
                let v = listed.iter().find(|v| v.id == *name).context("listed above")?;
                let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
                let got: BTreeMap<&str, &str> = v.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                anyhow::ensure!(got == want, "node {name} is listed with labels {got:?}, started with {want:?}");
            }
            Ok(())
        });
        if let Err(e) = connected {
            fleet.report(&format!("{e:#}"));
            return Err(e);
        }
        if !destinations_yaml.is_empty() {
            fleet.cluster.apply_destinations(destinations_yaml).await?;
        }
        Ok(fleet)
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every node's witness lines.
    pub fn witness(&self) -> anyhow::Result<Vec<WitnessLine>> {
        let mut all = vec![];
        for n in &self.nodes {
            all.extend(n.witness()?);
        }
        Ok(all)
    }

    /// Every node log's and coordinator log's tail.
    pub fn logs(&self) -> String {
        let mut out = self.cluster.coord_logs(40);
        for n in &self.nodes {
            out.push_str(&format!("\n=== node {} ({}):\n{}", n.name, n.log_file.display(), n.log_tail(60)));
        }
        out
    }

    fn report(&self, why: &str) {
        eprintln!("\n##### test failed: {why}\n##### test dir: {}\n{}\n", self.cluster.path().display(), self.logs());
    }

    /// End a test: on error, print the logs and panic with the error.
    pub fn finish(mut self, r: anyhow::Result<()>) {
        if let Err(e) = r {
            self.report(&format!("{e:#}"));
            self.reported = true;
            panic!("{e:#}");
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            self.report("panicked");
        }
    }
}

/// Deployment tests start 3 coordinators and several nodes each; on a
/// 2-core machine more than a couple at once only measure the scheduler of
/// the OS. `FLEET_TEST_PARALLEL` (default 2) bounds how many run at once.
pub struct TestSlot(());

static SLOTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl TestSlot {
    pub fn take() -> TestSlot {
        let max: usize = std::env::var("FLEET_TEST_PARALLEL").ok().and_then(|v| v.parse().ok()).unwrap_or(2).max(1);
        let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= max {
            used = SLOT_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        TestSlot(())
    }
}

impl Drop for TestSlot {
    fn drop(&mut self) {
        let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(1);
        SLOT_FREED.notify_one();
    }
}

// ------------------------------------------------------ failure injection
//
// Added for `tests/failures.rs`: signals to coordinators, the leader as
// `fleetctl` reports it, and `fleetctl` runs that own what they need (so a
// test can kill and restart coordinators while one is in progress).

impl Cluster {
    /// The pid of coordinator `id`, while its process runs.
    pub fn pid_of(&self, id: u64) -> Option<u32> {
        self.coords.get(&id)?.child.as_ref().map(|c| c.id())
    }

    /// Send `signal` (a name `kill` knows: `STOP`, `CONT`, `KILL` ...) to
    /// coordinator `id`.
    pub fn signal(&self, id: u64, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid_of(id).with_context(|| format!("coordinator {id} is not running"))?;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} (coordinator {id}) failed: {status}");
        Ok(())
    }

    /// The leader's id as `fleetctl cluster status -o json` reports it.
    pub async fn leader_id(&self) -> anyhow::Result<u64> {
        let run = self.ctl(&["cluster", "status", "-o", "json"]).await?;
        run.expect_code(0)?;
        run.json::<ClusterStatusView>()?.leader_id.with_context(|| format!("no leader in {run}"))
    }

    /// `fleetctl ARGS` as the operator in a task of its own: the returned
    /// handle borrows nothing from the cluster.
    pub fn spawn_ctl(&self, args: &[&str]) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<CtlRun>>> {
        let ctx = self.context_file("operator")?;
        let ctl = self.ctl.clone();
        let cwd = self.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Ok(tokio::spawn(async move { run_fleetctl(&ctl, &ctx, &cwd, args).await }))
    }
}

/// Run `fleetctl ARGS` with context file `ctx` in `cwd`, the connection
/// environment cleared so only the context counts.
async fn run_fleetctl(ctl: &Path, ctx: &Path, cwd: &Path, args: Vec<String>) -> anyhow::Result<CtlRun> {
    let started = Instant::now();
    let out = tokio::process::Command::new(ctl)
        .args(&args)
        .env("FLEET_CONTEXT", ctx)
        .env_remove("FLEET_ADDR")
        .env_remove("FLEET_CA")
        .env_remove("FLEET_CERT")
        .env_remove("FLEET_KEY")
        .current_dir(cwd)
        .kill_on_drop(true)
        .output()
        .await
        .context("running fleetctl")?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    Ok(CtlRun {
        args,
        code: out.status.code().unwrap_or(-1),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        elapsed: started.elapsed(),
    })
}
