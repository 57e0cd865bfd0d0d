//! CPU time and disk writes of processes, from `/proc` (Linux): where a
//! benchmark phase spent its time, without instrumenting the binaries.

use std::collections::BTreeMap;

/// Clock ticks per second of `utime`/`stime` (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// A process's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// User + system CPU of every thread, live or exited, in ms.
    pub cpu_ms: f64,
    /// Bytes this process caused to be written to storage.
    pub write_bytes: u64,
    /// Bytes passed to write(2)/send(2) (files and sockets).
    pub wchar: u64,
    /// CPU ms by thread name (live threads only).
    pub threads: BTreeMap<String, f64>,
}

/// utime + stime (fields 14 and 15) of a `stat` line, in ms.
fn stat_cpu_ms(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 1000.0 / TICKS_PER_S)
}

pub fn sample(pid: u32) -> Sample {
    let mut s = Sample::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        s.cpu_ms = stat_cpu_ms(&stat).unwrap_or(0.0);
    }
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        for line in io.lines() {
            if let Some(v) = line.strip_prefix("write_bytes: ") {
                s.write_bytes = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("wchar: ") {
                s.wchar = v.trim().parse().unwrap_or(0);
            }
        }
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path();
            let name = std::fs::read_to_string(p.join("comm")).map(|c| c.trim().to_string()).unwrap_or_default();
            let ms = std::fs::read_to_string(p.join("stat")).ok().and_then(|st| stat_cpu_ms(&st)).unwrap_or(0.0);
            *s.threads.entry(thread_class(&name)).or_default() += ms;
        }
    }
    s
}

/// Group numbered threads (`rocksdb:low0`, `tokio-runtime-w`) by name.
fn thread_class(name: &str) -> String {
    name.trim_end_matches(|c: char| c.is_ascii_digit()).to_string()
}

/// What changed between two samples of one process.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub cpu_ms: f64,
    pub write_bytes: u64,
    pub wchar: u64,
    pub threads: BTreeMap<String, f64>,
}

pub fn delta(before: &Sample, after: &Sample) -> Delta {
    let mut threads = BTreeMap::new();
    for (name, ms) in &after.threads {
        let d = ms - before.threads.get(name).copied().unwrap_or(0.0);
        if d > 0.0 {
            threads.insert(name.clone(), d);
        }
    }
    Delta {
        cpu_ms: after.cpu_ms - before.cpu_ms,
        write_bytes: after.write_bytes.saturating_sub(before.write_bytes),
        wchar: after.wchar.saturating_sub(before.wchar),
        threads,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stat_line() {
        let line = "123 (tokio (x) w) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(super::stat_cpu_ms(line), Some(3000.0));
    }
}
