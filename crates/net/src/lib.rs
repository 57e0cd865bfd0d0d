//! What every Fleet process that talks to the cluster shares, defined once:
//! the wall clock (`now_ms`), durable file replacement (`write_atomic`), the
//! metadata keys and structured error details of the wire contract, and
//! loading TLS identities from PEM files.
//!
//! `fleet-core` stays pure (no clock, no I/O); this crate is the thin layer
//! of I/O that coordinators, nodes and `fleetctl` have in common.

pub mod tls;
pub mod token;
pub mod wire;

pub use tls::{error_chain, TlsError, TlsMaterial};
pub use wire::LEADER_METADATA;

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The resident memory (VmRSS) of process `pid` (`"self"` for this one),
/// in bytes, from `/proc/PID/status` (Linux); `None` where that cannot be
/// read.
pub fn resident_bytes(pid: impl std::fmt::Display) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Write `bytes` to `path` so that a crash leaves either the old or the new
/// contents: write a temporary file beside it (`.NAME.tmp`), fsync it,
/// rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, |f| f.write_all(bytes)).map(|_| ())
}

/// [`write_atomic`] with the contents written by `write` through a buffer,
/// so a large file is never held in memory whole; answers its length.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<u64> {
    replace(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(256 << 10, f);
        write(&mut w)?;
        w.flush()
    })
}

fn replace(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let len = {
        let mut f = std::fs::File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        f.metadata()?.len()
    };
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    /// This process's RSS is read, and is what a running test has at
    /// least (a megabyte); a process that does not exist has none.
    #[test]
    fn resident_bytes_reads_proc() {
        let own = super::resident_bytes("self").expect("/proc/self/status has VmRSS");
        assert!(own > 1 << 20, "{own} bytes");
        assert_eq!(super::resident_bytes(u32::MAX), None);
    }
}
