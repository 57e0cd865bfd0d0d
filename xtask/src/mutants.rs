//! `cargo xtask mutants`: the checker is not blind. Each mutant is a build
//! with one guarantee broken on purpose (a cargo feature that no other build
//! enables); the tests that guard that guarantee must FAIL against it, and
//! pass without it. A mutant that survives means the suite would not notice
//! the guarantee breaking, and fails this command.
//!
//! Mutants build in their own target dir beside the main one, so a mutated
//! binary can never be picked up by the normal test run.

use std::process::Command;

use anyhow::{bail, Context};

use crate::root;

struct Mutant {
    /// The guarantee it breaks.
    breaks: &'static str,
    /// The package whose tests run (with `--features FEATURE` unless the
    /// mutation is in `bins`).
    package: &'static str,
    /// The mutation; `crate/feature` when it is in another crate.
    feature: &'static str,
    /// Packages whose binaries the tests start, built first with the same
    /// features (plus `bin_features`), in the mutants' own target dir.
    bins: &'static [&'static str],
    bin_features: &'static [&'static str],
    /// `cargo test` target selection and name filters.
    targets: &'static [&'static str],
    filters: &'static [&'static str],
    /// At least one of these tests must fail against the mutant.
    must_fail: &'static [&'static str],
}

const MUTANTS: &[Mutant] = &[
    Mutant {
        breaks: "a node refuses steps whose fencing token is older than one it has seen (invariant 6)",
        package: "fleet-node",
        feature: "mutation-skip-fencing",
        bins: &[],
        bin_features: &[],
        targets: &["--lib", "--test", "node"],
        filters: &["tokens_only_grow", "stale_fencing_tokens"],
        must_fail: &["fencing::tests::tokens_only_grow_and_survive_a_restart", "stale_fencing_tokens_are_refused_and_remembered"],
    },
    Mutant {
        breaks: "a held destination lock is not granted to anyone else (invariant 1)",
        package: "fleet-core",
        feature: "mutation-steal-lock",
        bins: &[],
        bin_features: &[],
        targets: &["--lib"],
        filters: &["state::tests"],
        must_fail: &["state::tests::lock_table"],
    },
    Mutant {
        breaks: "a write is acknowledged only after a majority fsynced it (invariant 2)",
        package: "fleet-tests",
        feature: "fleet-coord/mutation-ack-before-fsync",
        bins: &["fleet-coord", "fleetctl"],
        bin_features: &["fleet-coord/failpoints"],
        targets: &["--test", "disk"],
        filters: &["slow_fsync_everywhere", "failing_fsync_everywhere"],
        must_fail: &[
            "a_slow_fsync_everywhere_delays_every_acknowledgement_and_loses_nothing",
            "a_failing_fsync_everywhere_acknowledges_nothing_and_stops_the_coordinators",
        ],
    },
];

pub fn mutants() -> anyhow::Result<()> {
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => std::path::PathBuf::from(t).with_file_name("mutants-target"),
        None => root().join("target").join("mutants"),
    };
    let mut caught = vec![];
    for m in MUTANTS {
        eprintln!("mutants: {} built with `{}`: {}", m.package, m.feature, m.breaks);
        let (ok, _) = cargo_test(m, None, &target_dir)?;
        if !ok {
            bail!("the guarding tests of {} fail even without the mutation; fix them first", m.feature);
        }
        let (ok, out) = cargo_test(m, Some(m.feature), &target_dir)?;
        let failed: Vec<&str> = m.must_fail.iter().copied().filter(|t| out.contains(&format!("test {t} ... FAILED"))).collect();
        if ok || failed.is_empty() {
            bail!(
                "mutant `{}` SURVIVED: with the guarantee broken ({}), none of {:?} failed. The suite would not notice this bug",
                m.feature,
                m.breaks,
                m.must_fail
            );
        }
        caught.push(format!("{:<24} caught by {}", m.feature, failed.join(", ")));
    }
    eprintln!("mutants: every mutant was caught");
    for line in caught {
        println!("{line}");
    }
    Ok(())
}

fn cargo(subcommand: &str, target_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).arg(subcommand).arg("--target-dir").arg(target_dir);
    // No debug info in these throwaway builds: less to compile and link.
    cmd.env("CARGO_PROFILE_DEV_DEBUG", "0");
    // RocksDB as the main build compiled it (same version and flags), so
    // the mutants' target dir does not compile its C++ a second time.
    if let Some(lib) = built_rocksdb() {
        cmd.env("ROCKSDB_LIB_DIR", lib).env("ROCKSDB_STATIC", "1");
    }
    cmd
}

/// The directory holding `librocksdb.a` in the main target dir, if built.
pub(crate) fn built_rocksdb() -> Option<std::path::PathBuf> {
    let target = std::path::PathBuf::from(std::env::var_os("CARGO_TARGET_DIR")?);
    let build = std::fs::read_dir(target.join("debug").join("build")).ok()?;
    build
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("librocksdb-sys-"))
        .map(|e| e.path().join("out"))
        .find(|out| out.join("librocksdb.a").is_file())
}

/// Build the binaries the tests start, with the mutation or without.
fn build_bins(m: &Mutant, feature: Option<&str>, target_dir: &std::path::Path) -> anyhow::Result<()> {
    if m.bins.is_empty() {
        return Ok(());
    }
    let mut cmd = cargo("build", target_dir);
    cmd.arg("--bins");
    for p in m.bins {
        cmd.args(["-p", p]);
    }
    let features: Vec<&str> = m.bin_features.iter().copied().chain(feature).collect();
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo_test(m: &Mutant, feature: Option<&str>, target_dir: &std::path::Path) -> anyhow::Result<(bool, String)> {
    build_bins(m, feature, target_dir)?;
    let mut cmd = cargo("test", target_dir);
    cmd.args(["--no-fail-fast", "-p", m.package]).args(m.targets);
    // With `bins`, the mutation is in the binaries the tests start.
    if let Some(f) = feature.filter(|_| m.bins.is_empty()) {
        cmd.args(["--features", f]);
    }
    cmd.arg("--").args(m.filters);
    eprintln!("+ {cmd:?}");
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() && !text.contains("test result:") {
        bail!(
            "{cmd:?} did not get to run its tests:\n{}",
            text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok((out.status.success(), text))
}
