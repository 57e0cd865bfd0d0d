//! Small helpers: durable file writes, log tails, durations as people
//! write them. (The wall clock is `fleet_net::now_ms`.)

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

pub use fleet_net::write_atomic;

/// The last `lines` lines (at most ~4 KiB) of a text file, for error
/// messages; empty when it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 4096;
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX && f.seek(SeekFrom::Start(len - MAX)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let skip_partial = usize::from(len > MAX && all.len() > 1);
    let from = all.len().saturating_sub(lines).max(skip_partial);
    all[from..].join("\n")
}

/// `1.5s`, `200ms`, `2m`: a duration as people write it.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 120_000 {
        let (secs, rest) = (ms / 1000, ms % 1000);
        return if rest == 0 { format!("{secs}s") } else { format!("{:.1}s", ms as f64 / 1000.0) };
    }
    let (mins, secs) = (ms / 60_000, (ms % 60_000) / 1000);
    if secs == 0 {
        format!("{mins}m")
    } else {
        format!("{mins}m{secs}s")
    }
}

/// `s` with every character that does not belong in a file name replaced.
pub fn safe_file_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// Quote `text` as an indented block for a multi-line error message.
pub fn indent(text: &str) -> String {
    if text.trim().is_empty() {
        return "    (no output)".to_string();
    }
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        let cases = [(200, "200ms"), (1000, "1s"), (1500, "1.5s"), (120_000, "2m"), (125_000, "2m5s")];
        for (ms, want) in cases {
            assert_eq!(human(Duration::from_millis(ms)), want);
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
        let long: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, long).unwrap();
        assert_eq!(tail(&p, 2), "line 1998\nline 1999");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"1").unwrap();
        write_atomic(&p, b"2").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
