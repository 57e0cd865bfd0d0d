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
    package: &'static str,
    feature: &'static str,
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
        targets: &["--lib", "--test", "node"],
        filters: &["tokens_only_grow", "stale_fencing_tokens"],
        must_fail: &["fencing::tests::tokens_only_grow_and_survive_a_restart", "stale_fencing_tokens_are_refused_and_remembered"],
    },
    Mutant {
        breaks: "a held destination lock is not granted to anyone else (invariant 1)",
        package: "fleet-core",
        feature: "mutation-steal-lock",
        targets: &["--lib"],
        filters: &["state::tests"],
        must_fail: &["state::tests::lock_table"],
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

fn cargo_test(m: &Mutant, feature: Option<&str>, target_dir: &std::path::Path) -> anyhow::Result<(bool, String)> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(["test", "--no-fail-fast", "-p", m.package]).arg("--target-dir").arg(target_dir).args(m.targets);
    if let Some(f) = feature {
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
