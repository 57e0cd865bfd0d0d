//! `cargo xtask fuzz [--seconds N] [TARGET...]`: run the coverage-guided
//! fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer) for a bounded time each
//! and print how many inputs each tried. Any panic, any input slower than
//! the per-input timeout (a hang) and any memory blow-up fails the run; the
//! crashing input is kept in `fuzz/artifacts/<target>/` and replays with
//! `cargo +nightly fuzz run <target> <file>`.
//!
//! libFuzzer needs a nightly toolchain (`-Zsanitizer`). Without one the run
//! is skipped with a message saying so (the property tests in the normal
//! suite still cover the same parsers, without coverage guidance).
//! The corpus grows in the cargo cache (outside the clone), seeded from
//! `fuzz/seeds/<target>/`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

use crate::{root, run};

pub const TARGETS: &[&str] = &["manifest", "destinations", "nested", "commands"];

/// An input taking longer than this is a hang.
const PER_INPUT_TIMEOUT_S: u32 = 2;

pub fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let mut seconds = 60u64;
    let mut targets: Vec<String> = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--" => {}
            "--seconds" => {
                seconds = it.next().context("--seconds needs a number")?.parse().context("--seconds needs a whole number of seconds")?;
            }
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown fuzz argument `{other}`; targets are {TARGETS:?}, option --seconds N"),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    if !has_nightly() {
        eprintln!(
            "fuzz: SKIPPED: no nightly toolchain (`rustup toolchain install nightly` adds one); libFuzzer needs it. \
             The parsers are still covered by the property tests of `cargo xtask test`."
        );
        return Ok(());
    }
    ensure_cargo_fuzz()?;
    let cache = cache_dir();
    let target_dir = cache.join("fuzz-target");
    let fuzz_dir = root().join("fuzz");
    run(Command::new("cargo")
        .current_dir(&fuzz_dir)
        .args(["+nightly", "fuzz", "build", "-O", "--target-dir"])
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR"))?;
    let mut report = vec![];
    for t in &targets {
        let corpus = cache.join("fuzz-corpus").join(t);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(t);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir).args(["+nightly", "fuzz", "run", "-O", "--target-dir"]).arg(&target_dir).arg(t).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={PER_INPUT_TIMEOUT_S}"))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .env_remove("CARGO_TARGET_DIR");
        eprintln!("+ {cmd:?}");
        let out = cmd.output().with_context(|| format!("running the fuzz target {t}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "fuzz target `{t}` failed ({}):\n{}\nthe input is kept in fuzz/artifacts/{t}/; replay it with `cd fuzz && cargo +nightly fuzz run {t} <file>`",
                out.status,
                tail.join("\n")
            );
        }
        let runs = stderr.lines().find_map(|l| l.strip_prefix("Done ").and_then(|r| r.split_whitespace().next())).unwrap_or("?");
        report.push(format!("{t:<14} {runs:>12} inputs in {seconds} s, no crash, none slower than {PER_INPUT_TIMEOUT_S} s"));
    }
    eprintln!("fuzz: every target passed");
    for line in report {
        println!("{line}");
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("fleet"),
    }
}

fn has_nightly() -> bool {
    Command::new("cargo").args(["+nightly", "--version"]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo").args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !present {
        eprintln!("cargo-fuzz is missing; installing it (about a minute)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--version", "=0.13.2", "--locked"]))?;
    }
    Ok(())
}
