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
    use std::os::unix::process::CommandExt;
    let certs = spec.dir.join("certs");
    let addr_file = spec.addr_file();
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log_file())
        .with_context(|| format!("opening {}", spec.log_file().display()))?;
    let mut cmd = coordinator_command(bin, spec.id, &spec.listen, &spec.data_dir(), &certs);
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
    Command::new("kill")
        .arg("-0")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
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
