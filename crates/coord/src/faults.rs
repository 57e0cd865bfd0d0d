//! Disk faults on demand, for the disk-fault tests and the chaos harness.
//!
//! Only in builds with the `failpoints` feature (the workspace's debug
//! build, which the tests use; `cargo build --release -p fleet-coord`
//! leaves it out and the failpoints compile to nothing). Such a coordinator
//! reads `<data-dir>/failpoints` while it runs: one `NAME=ACTIONS` per line
//! in the `fail` crate's syntax, for example
//!
//! ```text
//! raft-log-fsync=sleep(300)      # every fsync of the Raft log takes 300 ms more
//! raft-log-fsync=return          # fsync fails (an I/O error)
//! raft-log-append=return         # writing log entries fails (a full disk)
//! ```
//!
//! A name that leaves the file is switched off. After applying a version
//! of the file the coordinator writes what it applied to
//! `<data-dir>/failpoints.applied`, so a test knows when the fault is on.

use std::path::Path;

/// The failpoints this build has (see `store/log.rs`).
pub const NAMES: &[&str] = &["raft-log-fsync", "raft-log-append"];

/// Start applying `<data_dir>/failpoints` as it changes.
#[cfg(feature = "failpoints")]
pub fn watch(data_dir: &Path) -> std::io::Result<()> {
    let path = data_dir.join("failpoints");
    let applied = data_dir.join("failpoints.applied");
    tracing::warn!(file = %path.display(), "fault injection is compiled in (feature `failpoints`): this coordinator applies the failpoints that file names");
    std::thread::Builder::new().name("failpoints".into()).spawn(move || {
        let mut last: Option<String> = None;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if last.as_deref() != Some(text.as_str()) {
                apply(&text);
                if let Err(e) = std::fs::write(&applied, &text) {
                    tracing::warn!(file = %applied.display(), error = %e, "cannot confirm the failpoints applied");
                }
                last = Some(text);
            }
            // Polling a small file: a fault is on within 50 ms of being written.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    })?;
    Ok(())
}

#[cfg(feature = "failpoints")]
fn apply(text: &str) {
    let wanted = parse(text);
    for name in NAMES {
        if !wanted.iter().any(|(n, _)| n == name) {
            fail::remove(name);
        }
    }
    for (name, actions) in wanted {
        match fail::cfg(name.as_str(), actions.as_str()) {
            Ok(()) => tracing::warn!(failpoint = %name, %actions, "failpoint set"),
            Err(e) => tracing::error!(failpoint = %name, %actions, error = %e, "bad failpoint actions; ignored"),
        }
    }
}

/// Without the feature there is nothing to watch.
#[cfg(not(feature = "failpoints"))]
pub fn watch(_data_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// `NAME=ACTIONS` lines; blank lines and `#` comments skipped, unknown
/// names dropped with a warning.
pub fn parse(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some((name, actions)) = line.split_once('=') else {
            tracing::error!(%line, "a failpoint line is NAME=ACTIONS; ignored");
            continue;
        };
        let name = name.trim();
        if !NAMES.contains(&name) {
            tracing::error!(failpoint = %name, known = ?NAMES, "no such failpoint; ignored");
            continue;
        }
        out.push((name.to_string(), actions.trim().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_and_unknown_names() {
        let text = "# slow disk\nraft-log-fsync = sleep(300)  # ms\n\nraft-log-append=return\nno-such=return\nbroken line\n";
        assert_eq!(
            parse(text),
            vec![("raft-log-fsync".to_string(), "sleep(300)".to_string()), ("raft-log-append".to_string(), "return".to_string())]
        );
        assert!(parse("").is_empty());
    }
}
