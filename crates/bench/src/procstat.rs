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

/// Busy CPU ms of the whole machine (all cores, every process), from the
/// first line of /proc/stat: everything but idle and iowait.
pub fn machine_busy_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(line) = stat.lines().next() else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let busy: f64 = v.iter().take(8).sum::<f64>() - v[3] - v[4];
    busy * 1000.0 / TICKS_PER_S
}

/// CPU ms of a process (all threads), cheap enough to sample often.
pub fn cpu_ms(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| stat_cpu_ms(&s)).unwrap_or(0.0)
}

pub fn sample(pid: u32) -> Sample {
    let mut s = Sample { cpu_ms: cpu_ms(pid), ..Sample::default() };
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

/// Samples the CPU of some processes every `every` on a thread, with the
/// wall-clock time (Unix ms, the clock the step records use), so a phase's
/// CPU can be cut to a time window found afterwards.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(i64, Vec<f64>)>>,
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Sampler {
    /// The last value of every sample is the machine's busy CPU
    /// ([`machine_busy_ms`]).
    pub fn start(pids: Vec<u32>, every: std::time::Duration) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            loop {
                let mut v: Vec<f64> = pids.iter().map(|p| cpu_ms(*p)).collect();
                v.push(machine_busy_ms());
                out.push((unix_ms(), v));
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return out;
                }
                std::thread::sleep(every);
            }
        });
        Sampler { stop, thread }
    }

    pub fn finish(self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Samples(self.thread.join().unwrap_or_default())
    }
}

pub struct Samples(pub Vec<(i64, Vec<f64>)>);

impl Samples {
    /// CPU ms per process from the last sample at or before `from_ms` to
    /// the first at or after `to_ms` (so the window is covered, plus at
    /// most one sampling period on each side), and that span in ms.
    pub fn window(&self, from_ms: i64, to_ms: i64) -> (Vec<f64>, i64) {
        let v = &self.0;
        if v.is_empty() {
            return (vec![], 0);
        }
        let a = v.iter().rposition(|(t, _)| *t <= from_ms).unwrap_or(0);
        let b = v.iter().position(|(t, _)| *t >= to_ms).unwrap_or(v.len() - 1);
        let cpu = v[b].1.iter().zip(&v[a].1).map(|(x, y)| x - y).collect();
        (cpu, v[b].0 - v[a].0)
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
