//! A local cluster on one machine: `fleetctl dev up` / `dev down`.
//!
//! Also used by the integration tests, so tests and the quick start start
//! coordinators the same way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Find a sibling binary (`fleet-coord` next to `fleetctl`), else `PATH`.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("FLEET_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Ok(me) = std::env::current_exe() {
        for dir in me.ancestors().skip(1).take(2) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("cannot find the `{name}` binary next to fleetctl or on PATH; build it with `cargo build --bins` or set FLEET_BIN_DIR")
}

/// How to start one coordinator.
#[derive(Debug, Clone)]
pub struct CoordSpec {
    pub id: u64,
    /// Root of this cluster's files: certs/, data-N/, coord-N.log, coord-N.addr.
    pub dir: PathBuf,
    pub bootstrap: bool,
    /// Listen address; `127.0.0.1:0` picks a free port.
    pub listen: String,
    /// Extra flags (tests tune snapshots and timeouts).
    pub extra_args: Vec<String>,
}

impl CoordSpec {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("data-{}", self.id))
    }
    pub fn addr_file(&self) -> PathBuf {
        self.dir.join(format!("coord-{}.addr", self.id))
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join(format!("coord-{}.log", self.id))
    }
}

/// `fleet-coord` with its identity, address, data dir and the coordinator
/// certificate from `certs` (as written by `fleetctl certs init`).
pub fn coordinator_command(bin: &Path, id: u64, listen: &str, data_dir: &Path, certs: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--id")
        .arg(id.to_string())
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join("coordinator.pem"))
        .arg("--key")
        .arg(certs.join("coordinator-key.pem"));
    cmd
}

/// Start a coordinator in its own process group (so a Ctrl-C in the
/// terminal that ran `dev up` does not stop it) and wait until it listens.
/// Returns the child and its address.
pub fn spawn_coordinator(bin: &Path, spec: &CoordSpec, wait: Duration) -> anyhow::Result<(Child, String)> {
    spawn_coordinator_under(&[], bin, spec, wait)
}

/// [`spawn_coordinator`] run under a command prefix `wrap` that execs it
/// (the tests' `ip netns exec NS`: the child's pid is the coordinator's).
pub fn spawn_coordinator_under(
    wrap: &[std::ffi::OsString],
    bin: &Path,
    spec: &CoordSpec,
    wait: Duration,
) -> anyhow::Result<(Child, String)> {
    use std::os::unix::process::CommandExt;
    let certs = spec.dir.join("certs");
    let addr_file = spec.addr_file();
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log_file())
        .with_context(|| format!("opening {}", spec.log_file().display()))?;
    let inner = coordinator_command(bin, spec.id, &spec.listen, &spec.data_dir(), &certs);
    let mut cmd = match wrap.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(inner.get_program()).args(inner.get_args());
            c
        }
        None => inner,
    };
    cmd.arg("--addr-file")
        .arg(&addr_file)
        .args(&spec.extra_args)
        .env_remove("FLEET_CA")
        .env_remove("FLEET_CERT")
        .env_remove("FLEET_KEY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file handle")?)
        .stderr(log)
        .process_group(0);
    if spec.bootstrap {
        cmd.arg("--bootstrap");
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            return Ok((child, addr.trim().to_string()));
        }
        if let Some(status) = child.try_wait().context("checking the coordinator process")? {
            let tail = tail_of(&spec.log_file(), 20);
            bail!("coordinator {} exited ({status}) before listening; its log ({}) ends with:\n{tail}", spec.id, spec.log_file().display());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("coordinator {} did not start listening within {wait:?}; see {}", spec.id, spec.log_file().display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Is a process with this pid alive (signal 0)?
pub fn alive(pid: u32) -> bool {
    Command::new("kill").arg("-0").arg(pid.to_string()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn stop(pid: u32, grace: Duration) {
    let _ = Command::new("kill").arg(pid.to_string()).stderr(Stdio::null()).status();
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).stderr(Stdio::null()).status();
    }
}

/// How to start one worker node of a dev cluster.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node id = the common name of its certificate (`node-1`).
    pub name: String,
    /// Root of the cluster's files: certs/<name>.pem, <name>/ (data), <name>.log.
    pub dir: PathBuf,
    /// Every coordinator's address.
    pub coords: Vec<String>,
    /// `key=value` labels.
    pub labels: Vec<String>,
}

impl NodeSpec {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(&self.name)
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }
}

/// `fleet-node` with its certificate, coordinators, labels and data dir.
pub fn node_command(bin: &Path, spec: &NodeSpec) -> Command {
    let certs = spec.dir.join("certs");
    let mut cmd = Command::new(bin);
    cmd.arg("--coord")
        .arg(spec.coords.join(","))
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("{}.pem", spec.name)))
        .arg("--key")
        .arg(certs.join(format!("{}-key.pem", spec.name)))
        .arg("--data-dir")
        .arg(spec.data_dir());
    for l in &spec.labels {
        cmd.arg("--label").arg(l);
    }
    cmd
}

/// Start a worker node in its own process group, logging to its log file.
/// The directory of `bin` goes first on its `PATH`, so the releases it
/// starts find sibling binaries such as `fleet-demo-app`.
pub fn spawn_node(bin: &Path, spec: &NodeSpec) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(spec.data_dir()).with_context(|| format!("creating {}", spec.data_dir().display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log_file())
        .with_context(|| format!("opening {}", spec.log_file().display()))?;
    let mut path: Vec<PathBuf> = bin.parent().map(|p| vec![p.to_path_buf()]).unwrap_or_default();
    path.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    let mut cmd = node_command(bin, spec);
    cmd.env("PATH", std::env::join_paths(path).context("PATH")?)
        .env_remove("FLEET_CA")
        .env_remove("FLEET_CERT")
        .env_remove("FLEET_KEY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file handle")?)
        .stderr(log)
        .process_group(0);
    cmd.spawn().with_context(|| format!("starting {}", bin.display()))
}

/// Is any process of process group `pgid` alive?
fn group_alive(pgid: u32) -> bool {
    Command::new("kill").args(["-0", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// Stop a process that leads its own process group (as [`spawn_node`]
/// starts nodes), then whatever it left running in that group (the
/// releases it started): SIGTERM to the leader, then to the group after
/// `grace`, then SIGKILL to the group.
pub fn stop_group(pid: u32, grace: Duration) {
    stop(pid, grace);
    if !group_alive(pid) {
        return;
    }
    let group = format!("-{pid}");
    let _ = Command::new("kill").args(["--", &group]).stderr(Stdio::null()).status();
    let deadline = Instant::now() + grace;
    while group_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if group_alive(pid) {
        let _ = Command::new("kill").args(["-9", "--", &group]).stderr(Stdio::null()).status();
    }
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time (clock ticks
/// since boot), which tells a process from a later one with the same pid.
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The app instances a (stopped) worker node left running: fleet-node
/// keeps them across its own restarts and records them in
/// `<data-dir>/apps/*.json` (one per destination and app; slots `active`,
/// `staged`, `retired`, each with `pid` and `proc_start`). Returns the pids of those still alive and
/// still the same process.
pub fn node_instances(data_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("apps")) else { return vec![] };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(rec) =
            std::fs::read_to_string(&path).map_err(anyhow::Error::from).and_then(|t| Ok(serde_json::from_str::<serde_json::Value>(&t)?))
        else {
            continue;
        };
        for slot in ["active", "staged", "retired"] {
            let inst = &rec[slot];
            let Some(pid) = inst["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 1) else { continue };
            let same = match inst["proc_start"].as_u64() {
                Some(start) => proc_start_time(pid) == Some(start),
                // Without a start time, insist on the environment Fleet gave it.
                None => std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    let app = rec["app"].as_str().unwrap_or_default();
                    env.split(|b| *b == 0).any(|kv| kv == format!("FLEET_APP={app}").as_bytes())
                }),
            };
            if same && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_instances_are_found_and_checked_by_start_time() {
        let me = std::process::id();
        let start = proc_start_time(me).expect("/proc of this process");
        let dir = tempfile::tempdir().unwrap();
        let apps = dir.path().join("apps");
        std::fs::create_dir_all(&apps).unwrap();
        // (file, contents, pids it should contribute)
        let cases: Vec<(&str, String, Vec<u32>)> = vec![
            ("web.json", format!(r#"{{"app":"web","active":{{"pid":{me},"proc_start":{start}}},"staged":null}}"#), vec![me]),
            ("api.json", format!(r#"{{"app":"api","retired":{{"pid":{me},"proc_start":{}}}}}"#, start + 1), vec![]),
            ("db.json", format!(r#"{{"app":"db","active":{{"pid":{me}}}}}"#), vec![]),
            ("notes.txt", format!(r#"{{"app":"x","active":{{"pid":{me},"proc_start":{start}}}}}"#), vec![]),
            ("broken.json", "{not json".to_string(), vec![]),
        ];
        for (file, text, want) in cases {
            let one = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(one.path().join("apps")).unwrap();
            std::fs::write(one.path().join("apps").join(file), &text).unwrap();
            assert_eq!(node_instances(one.path()), want, "{file}: {text}");
            std::fs::write(apps.join(file), &text).unwrap();
        }
        // All together: this process once, however often it is listed.
        assert_eq!(node_instances(dir.path()), vec![me]);
        assert!(node_instances(&dir.path().join("missing")).is_empty());
    }
}
