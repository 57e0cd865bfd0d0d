//! Child processes: spawning in their own process group with output to a
//! log file, watching them exit, stopping them (SIGTERM, then SIGKILL), and
//! recognising a pid after a node restart through `/proc`.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The directory of the running executable: programs installed beside
/// `fleet-node` (such as `fleet-demo-app`) are found there.
pub fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf))
}

/// `None` while the process runs; then how it ended.
pub type ExitWatch = watch::Receiver<Option<String>>;

/// Send `sig` to the process group `pgid` (our children lead their own
/// group, so pgid = pid). Never signals pid 0 or 1 or "every process".
pub fn signal_group(pgid: u32, sig: i32) -> bool {
    if pgid <= 1 || pgid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; the pgid is > 1,
    // so this never means "our own group" or "every process".
    unsafe { libc::kill(-(pgid as i32), sig) == 0 }
}

/// Kills a process group when dropped, unless disarmed: a step future that
/// is dropped (timeout, abort) leaves nothing running behind.
pub struct GroupGuard {
    pgid: Option<u32>,
}

impl GroupGuard {
    pub fn new(pgid: u32) -> Self {
        GroupGuard { pgid: Some(pgid) }
    }
    pub fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, libc::SIGKILL);
        }
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot):
/// with the pid, it identifies a process even if the pid is reused.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field 22 is fields[19].
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Is `pid` a live (not zombie) process, and the same one that started at
/// `start` (when known)?
pub fn alive(pid: u32, start: Option<u64>) -> bool {
    match (proc_start_time(pid), start) {
        (None, _) => false,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
    }
}

/// How a process ended, in words.
pub fn describe_exit(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGINT => " (SIGINT)",
            _ => "",
        };
        format!("was killed by signal {sig}{name}")
    } else {
        "ended".to_string()
    }
}

/// Find `program` the way a shell would, looking first in `prepend`.
pub fn resolve_program(program: &str, prepend: &[PathBuf]) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if p.is_file() { Ok(p) } else { Err(format!("`{program}` does not exist")) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = prepend.iter().cloned().chain(std::env::split_paths(&path)).collect();
    for d in &dirs {
        let candidate = d.join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(format!("`{program}` was not found in {}", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `prepend` in front of this process's PATH.
pub fn path_with(prepend: &[PathBuf]) -> std::ffi::OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let all: Vec<PathBuf> = prepend.iter().cloned().chain(std::env::split_paths(&current)).collect();
    std::env::join_paths(all).unwrap_or(current)
}

/// What to spawn.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub path_prepend: &'a [PathBuf],
    pub cwd: &'a Path,
    pub log: &'a Path,
    /// Kill the child (not its group) when the `Child` is dropped, and
    /// when the node itself dies (even by `kill -9`): a step's command
    /// must not run on after its node is gone, since the leader hands the
    /// step to another node once the lease is over.
    pub kill_on_drop: bool,
}

/// Spawn a child in its own process group, stdin from /dev/null, stdout
/// and stderr appended to the log. The node's own settings (`FLEET_NODE_*`,
/// `FLEET_ADDR`) are not passed on.
pub fn spawn(s: Spawn<'_>) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(s.log)?;
    let log2 = log.try_clone()?;
    let mut cmd = Command::new(s.program);
    cmd.args(s.args)
        .current_dir(s.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .kill_on_drop(s.kill_on_drop);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("FLEET_NODE_") || k == "FLEET_ADDR" {
            cmd.env_remove(&*k);
        }
    }
    let mut path = path_with(s.path_prepend);
    for (k, v) in s.env {
        if k == "PATH" {
            let mut dirs: Vec<PathBuf> = s.path_prepend.to_vec();
            dirs.extend(std::env::split_paths(v));
            path = std::env::join_paths(dirs).unwrap_or_else(|_| v.into());
        } else {
            cmd.env(k, v);
        }
    }
    cmd.env("PATH", path);
    if s.kill_on_drop {
        let node = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls
        // (prctl, getppid) are made, and nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                // SIGKILL when the node's thread that forked us dies; the
                // spawning threads are the runtime's workers, which live as
                // long as the node does.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The node may have died before the prctl took effect.
                if libc::getppid() != node {
                    return Err(std::io::Error::other("fleet-node exited while starting the command"));
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Watch a child we spawned: the returned watch turns `Some(how)` when it
/// has exited (and the rest of its process group has been killed, so no
/// grandchild keeps its port). `on_exit` then runs with the description.
pub fn watch_child(mut child: Child, on_exit: impl FnOnce(String) + Send + 'static) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let how = match child.wait().await {
            Ok(status) => describe_exit(&status),
            Err(e) => format!("could not be waited for ({e})"),
        };
        signal_group(pid, libc::SIGKILL);
        let _ = tx.send(Some(how.clone()));
        on_exit(how);
    });
    rx
}

/// Watch a process that is not our child (adopted after a node restart) by
/// polling `/proc`: it cannot be waited for.
pub fn watch_pid(pid: u32, start: Option<u64>, on_exit: impl FnOnce(String) + Send + 'static) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if !alive(pid, start) {
                break;
            }
            if tx.is_closed() {
                // Nobody holds the watch any more (the adapter is gone).
                return;
            }
        }
        signal_group(pid, libc::SIGKILL);
        let how = "exited (status unknown: adopted after a node restart)".to_string();
        let _ = tx.send(Some(how.clone()));
        on_exit(how);
    });
    rx
}

/// Wait until the watched process has exited, at most `limit`.
pub async fn wait_exit(exit: &mut ExitWatch, limit: Duration) -> Option<String> {
    let r = tokio::time::timeout(limit, exit.wait_for(|e| e.is_some())).await.map(|r| r.map(|v| v.clone()));
    match r {
        Ok(Ok(v)) => v,
        // The sender is gone: the watcher task ended (runtime shutting down).
        Ok(Err(_)) => exit.borrow().clone().or_else(|| Some("gone".to_string())),
        Err(_) => None,
    }
}

/// Stop a process group: SIGTERM, wait up to `grace`, SIGKILL, wait. Ok
/// when it is gone (also if it already was).
pub async fn stop(pid: u32, mut exit: ExitWatch, grace: Duration) -> Result<String, String> {
    if let Some(how) = exit.borrow().clone() {
        return Ok(how);
    }
    signal_group(pid, libc::SIGTERM);
    if let Some(how) = wait_exit(&mut exit, grace).await {
        return Ok(how);
    }
    tracing::warn!(pid, "did not exit within {grace:?} of SIGTERM; sending SIGKILL");
    signal_group(pid, libc::SIGKILL);
    match wait_exit(&mut exit, Duration::from_secs(10)).await {
        Some(how) => Ok(how),
        None => Err(format!("pid {pid} did not exit even after SIGKILL (stuck in the kernel?); check `ps -o stat,wchan -p {pid}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = std::process::id();
        let start = proc_start_time(me);
        assert!(start.is_some());
        assert!(alive(me, start));
        assert!(!alive(me, start.map(|s| s + 1)));
        assert!(!alive(u32::MAX - 1, None));
    }

    #[test]
    fn never_signals_init_or_everyone() {
        assert!(!signal_group(0, 0));
        assert!(!signal_group(1, 0));
    }

    #[test]
    fn resolves_programs() {
        assert!(resolve_program("sh", &[]).is_ok());
        let e = resolve_program("no-such-program-fleet", &[PathBuf::from("/nonexistent")]).unwrap_err();
        assert!(e.contains("/nonexistent"), "{e}");
        assert!(resolve_program("/bin/sh", &[]).is_ok());
    }
}
