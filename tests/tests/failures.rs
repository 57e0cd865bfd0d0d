//! Failure handling end to end: real `fleet-coord` (3), `fleet-node` and
//! `fleet-demo-app` processes on 127.0.0.1, driven through the real
//! `fleetctl` binary and checked through its JSON output, the nodes'
//! witness files and `/proc`.
//!
//! * step errors by class: transient (exit 75) retried with growing
//!   backoff, auth (exit 77) failing at once;
//! * a hanging step cut off by its step timeout, a deployment cut off by
//!   its deadline (exit 5);
//! * queue policies (`reject`, `coalesce`, `queue`), `--lock-wait`,
//!   idempotency keys, `lock queue`, `--dry-run`;
//! * `kill -9` of the leader at 20 random points of 20 deployments;
//! * a leader paused (SIGSTOP) past the election timeout, then woken.
//!
//! Build the binaries first:
//! `cargo build -p fleet-coord -p fleetctl -p fleet-node -p fleet-demo-app`.
//! `FLEET_KEEP_TEST_DIR=1` keeps logs, data dirs and witness files.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_tests::checks::{assert_witness_safe, instances, now_ms, WitnessLine};
use fleet_tests::harness::{eventually, CtlRun, Fleet};
use fleet_tests::json::{DestinationRecord, Line, LockQueueView};
use fleet_tests::values::{event, event_at, kind, show, status, steps, transitions};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

// ------------------------------------------------------------------ helpers

/// A quick, honest health check of the demo app.
const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 1, deadline: 10s }";

const DEV: &str = "destinations:\n  - name: dev\n    selector: { env: dev }\n";

fn one_node() -> Vec<(&'static str, &'static [(&'static str, &'static str)])> {
    vec![("node-1", &[("env", "dev")])]
}

fn two_nodes() -> Vec<(&'static str, &'static [(&'static str, &'static str)])> {
    vec![("node-1", &[("env", "dev")]), ("node-2", &[("env", "dev")])]
}

/// `fleet.yaml` for the demo app; the release comes from `--release`.
fn manifest(app: &str, destination: &str, extra: &str) -> String {
    format!("app: {app}\ndestination: {destination}\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\n{extra}")
}

/// Shell commands as a YAML flow list (a JSON string is a YAML string).
fn yaml_list(items: &[&str]) -> String {
    serde_json::to_string(items).expect("strings serialize")
}

fn id_of(d: &Deployment) -> String {
    d.id.clone()
}

/// Deploy and require exit code `want`, with a result line that agrees.
async fn deploy(f: &Fleet, m: &Path, args: &[&str], want: i32) -> anyhow::Result<CtlRun> {
    let run = f.cluster.deploy(m, args).await?;
    run.expect_code(want)?;
    let result = run.result()?;
    ensure!(result.exit_code == want, "the result line's exit_code disagrees with the exit status: {run}");
    ensure!(result.state == result.deployment.state, "result state vs deployment state: {run}");
    Ok(run)
}

/// `deploy --detach`: the id.
async fn submit(f: &Fleet, m: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = args.to_vec();
    all.push("--detach");
    let run = f.cluster.deploy(m, &all).await?;
    run.expect_code(0)?;
    let lines = run.lines()?;
    ensure!(lines.len() == 1 && matches!(lines[0], Line::Submitted(_)), "--detach prints one `submitted` line: {run}");
    run.id()
}

/// `fleetctl watch ID -o json`, requiring exit code `want`: the deployment.
async fn watch(f: &Fleet, id: &str, want: i32) -> anyhow::Result<Deployment> {
    let run = f.cluster.ctl(&["watch", id, "-o", "json"]).await?;
    run.expect_code(want)?;
    run.deployment()
}

/// Ids of every deployment (`list -o json`), newest first.
async fn list_ids(f: &Fleet) -> anyhow::Result<Vec<String>> {
    let run = f.cluster.ctl(&["list", "--limit", "1000", "-o", "json"]).await?;
    run.expect_code(0)?;
    Ok(run.json::<Vec<Deployment>>()?.into_iter().map(|d| d.id).collect())
}

/// The `destinations -o json` record of `name`.
async fn destination(f: &Fleet, name: &str) -> anyhow::Result<DestinationRecord> {
    let run = f.cluster.ctl(&["destinations", "-o", "json"]).await?;
    run.expect_code(0)?;
    run.json::<Vec<DestinationRecord>>()?.into_iter().find(|d| d.name == name).with_context(|| format!("no destination {name} in {run}"))
}

/// `lock queue DEST -o json`.
async fn lock_queue(f: &Fleet, dest: &str) -> anyhow::Result<LockQueueView> {
    let run = f.cluster.ctl(&["lock", "queue", dest, "-o", "json"]).await?;
    run.expect_code(0)?;
    run.json()
}

fn queue_ids(q: &LockQueueView) -> Vec<String> {
    q.queue.iter().map(id_of).collect()
}

/// For error messages: who holds the lock and the ids and states of the queue.
fn show_queue(q: &LockQueueView) -> String {
    let queue: Vec<String> = q.queue.iter().map(|d| format!("{} ({})", d.id, d.state)).collect();
    format!("{}: holder {:?} (token {:?}), queue {queue:?}", q.destination, q.lock_holder, q.lock_token)
}

/// Witness lines of one deployment.
fn witness_of(f: &Fleet, id: &str) -> anyhow::Result<Vec<WitnessLine>> {
    Ok(f.witness()?.into_iter().filter(|l| l.deployment == id).collect())
}

/// Node processes whose command line contains `needle`.
fn processes_matching(f: &Fleet, needle: &str) -> Vec<(String, u32, String)> {
    f.nodes
        .iter()
        .flat_map(|n| n.processes().into_iter().map(move |(pid, cmd)| (n.name.clone(), pid, cmd)))
        .filter(|(_, _, cmd)| cmd.contains(needle))
        .collect()
}

async fn assert_no_process_matching(f: &Fleet, needle: &str) -> anyhow::Result<()> {
    eventually(&format!("no node process running `{needle}`"), Duration::from_secs(3), || async {
        let left = processes_matching(f, needle);
        ensure!(left.is_empty(), "still running: {left:?}");
        Ok(Some(()))
    })
    .await
}

/// Each node runs exactly the instances `d` started there, nothing else.
async fn assert_only_instances_of(f: &Fleet, d: &Deployment) -> anyhow::Result<()> {
    let want = instances(d)?;
    eventually("the nodes to run only the last deployment's instances", Duration::from_secs(10), || async {
        for n in &f.nodes {
            let expected: BTreeSet<u32> = want.iter().filter(|(node, _)| *node == n.name).map(|(_, p)| *p).collect();
            let running = n.processes();
            let pids: BTreeSet<u32> = running.iter().map(|(p, _)| *p).collect();
            ensure!(pids == expected, "node {} should run exactly {expected:?} (of {}); it runs {running:?}", n.name, d.id);
        }
        Ok(Some(()))
    })
    .await
}

/// p-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ------------------------------------------------------- 1. error classes

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_then_succeed_and_auth_fails_at_once() {
    let f = Fleet::start(&one_node(), DEV).await.expect("cluster with a node");
    let r = error_classes(&f).await;
    f.finish(r);
}

async fn error_classes(f: &Fleet) -> anyhow::Result<()> {
    // Fails with 75 (transient) twice, then succeeds. The backoff is 200 ms,
    // then 600 ms: far enough apart that "it grows" is not a coin toss on a
    // loaded machine whose scheduler ticks every 100 ms.
    let count = f.cluster.path().join("attempts");
    let p = count.display();
    let flaky = format!("n=$(cat {p} 2>/dev/null || echo 0); echo $((n+1)) > {p}; [ $n -ge 2 ] || exit 75");
    let retry = "retry: { max_attempts: 3, backoff: 200ms, backoff_multiplier: 3 }\n";
    let m = f.cluster.write_file("flaky.yaml", &manifest("web", "dev", &format!("hooks: {{ pre: {} }}\n{retry}", yaml_list(&[&flaky]))))?;
    let run = deploy(f, &m, &["--release", "v1"], 0).await?;
    let d = run.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "{run}");
    let hook = &steps(&d)[0];
    ensure!(kind(hook) == "command" && status(hook) == "done", "the hook step: {}", show(hook));
    ensure!(hook.attempt == 3, "the hook succeeded at attempt {} (expected 3): {}", hook.attempt, show(hook));
    for (i, s) in steps(&d).iter().enumerate().skip(1) {
        ensure!(status(s) == "done" && s.attempt == 1, "step {i} ({}) is {} at attempt {}", kind(s), status(s), s.attempt);
    }
    let ran = std::fs::read_to_string(&count)?;
    ensure!(ran.trim() == "3", "the hook ran {} times, expected 3", ran.trim());

    // The node carried out exactly three attempts; the pauses between them grow.
    let id = id_of(&d);
    let mut tries: Vec<WitnessLine> = witness_of(f, &id)?.into_iter().filter(|l| l.step == 0 && !l.undo).collect();
    tries.sort_by_key(|l| l.attempt);
    let attempts: Vec<u32> = tries.iter().map(|l| l.attempt).collect();
    let oks: Vec<bool> = tries.iter().map(|l| l.ok).collect();
    ensure!(attempts == [1, 2, 3] && oks == [false, false, true], "witness of the hook: {tries:?}");
    let (gap1, gap2) = (tries[1].start_ms - tries[0].end_ms, tries[2].start_ms - tries[1].end_ms);
    eprintln!("retry pauses: {gap1} ms before attempt 2 (backoff 200 ms), {gap2} ms before attempt 3 (backoff 600 ms)");
    // A backoff is jittered down by up to a quarter (RetryPolicy::backoff_with_jitter):
    // 150–200 ms, then 450–600 ms, depending on the deployment's id.
    ensure!(gap1 >= 150, "attempt 2 started {gap1} ms after attempt 1 failed, before its 200 ms backoff (less at most 25 % jitter)");
    ensure!(gap2 >= 450, "attempt 3 started {gap2} ms after attempt 2 failed, before its 600 ms backoff (less at most 25 % jitter)");
    ensure!(gap2 > gap1, "the backoff did not grow: {gap1} ms, then {gap2} ms");
    ensure!(gap1 < 3_000 && gap2 < 3_600, "retries waited far longer than their backoff: {gap1} ms, {gap2} ms");

    // Exit 77: an auth failure. No retry despite max_attempts 3 (and a 2 s
    // backoff that a retry would have to wait out); failed and undone
    // (nothing ran before the hook), exit 3.
    let retry = "retry: { max_attempts: 3, backoff: 2s, backoff_multiplier: 2 }\n";
    let m = f.cluster.write_file("auth.yaml", &manifest("web", "dev", &format!("hooks: {{ pre: [\"exit 77\"] }}\n{retry}")))?;
    let run = deploy(f, &m, &["--release", "v2"], 3).await?;
    let d2 = run.deployment()?;
    ensure!(d2.state == DeployState::Failed, "{run}");
    ensure!(transitions(&d2) == ["queued", "running", "compensating", "failed"], "events: {:?}", transitions(&d2));
    let hook = &steps(&d2)[0];
    ensure!(status(hook) == "failed" && hook.attempt == 1, "the auth-failing hook: {}", show(hook));
    for (i, s) in steps(&d2).iter().enumerate().skip(1) {
        ensure!(status(s) == "pending", "step {i} ({}) ran after the hook failed: {}", kind(s), status(s));
    }
    let tries = witness_of(f, &id_of(&d2))?;
    ensure!(tries.len() == 1 && tries[0].attempt == 1 && !tries[0].ok, "an auth failure must not be retried: {tries:?}");
    let failed_after = event_at(&d2, "compensating")? - hook.finished_ms.context("the failed hook has no end time")?;
    ensure!(failed_after < 1_000, "the deployment failed {failed_after} ms after the attempt, as if it waited out the 2 s backoff");
    ensure!(run.elapsed < Duration::from_secs(10), "an auth failure took {:?} to report", run.elapsed);
    let reason = &event(&d2, "compensating")?.reason;
    ensure!(reason.contains("exit 77"), "the failure event does not name the failing command: {reason:?}");

    // v1 is still the current release, and nothing is locked.
    let dev = destination(f, "dev").await?;
    ensure!(
        dev.current.get("web").map(String::as_str) == Some("v1") && dev.lock_holder.is_none(),
        "destination after the failure: {dev:?}"
    );
    assert_witness_safe(&f.witness()?, &[&d, &d2])?;
    // Last, as everything above holds already: the error says it is an
    // authentication/permission problem, not just "a command failed"
    // (DESIGN.md: auth = fail now, say which credential).
    let error = steps(&d2)[0].error.as_deref().unwrap_or("").replace(&f.cluster.path().display().to_string(), "");
    let lower = error.to_lowercase();
    ensure!(
        ["auth", "credential", "permission", "not permitted", "denied"].iter().any(|w| lower.contains(w)),
        "the error of a step that exited 77 (auth class) does not say it is an auth/permission failure: {error:?}"
    );
    Ok(())
}

// ------------------------------------------------ 2. timeouts and deadline

#[tokio::test(flavor = "multi_thread")]
async fn hanging_step_is_cut_off_and_deadline_ends_with_exit_5() {
    let f = Fleet::start(&one_node(), DEV).await.expect("cluster with a node");
    let r = hanging(&f).await;
    f.finish(r);
}

async fn hanging(f: &Fleet) -> anyhow::Result<()> {
    // A hook that hangs, a 1 s step timeout, no retry: failed, exit 3.
    let extra = "hooks: { pre: [\"sleep 60\"] }\nstep_timeout: 1s\nretry: { max_attempts: 1 }\n";
    let m = f.cluster.write_file("hang.yaml", &manifest("web", "dev", extra))?;
    let run = deploy(f, &m, &["--release", "h1"], 3).await?;
    eprintln!("a hanging hook with step_timeout 1s failed after {:?}", run.elapsed);
    ensure!(run.elapsed < Duration::from_secs(6), "a step with a 1 s timeout took {:?} to fail the deployment", run.elapsed);
    let d = run.deployment()?;
    ensure!(d.state == DeployState::Failed && !d.timed_out, "{run}");
    let hook = &steps(&d)[0];
    ensure!(status(hook) == "failed" && hook.attempt == 1, "the hanging hook: {}", show(hook));
    let err = hook.error.as_deref().unwrap_or("");
    ensure!(err.contains("timed out after 1s"), "the error does not say the step timed out after 1s: {err:?}");
    let tries = witness_of(f, &id_of(&d))?;
    ensure!(tries.len() == 1, "one attempt only (max_attempts 1): {tries:?}");
    let took = tries[0].end_ms - tries[0].start_ms;
    ensure!((950..3_000).contains(&took), "the hook ran {took} ms under a 1 s step timeout");
    assert_no_process_matching(f, "sleep 60").await?;

    // A deadline of 2 s while a hook hangs (step timeout 5m): the leader
    // cancels, the hook is aborted, exit 5, cancelled and timed out.
    let extra = "hooks: { pre: [\"sleep 60\"] }\nstep_timeout: 5m\n";
    let m = f.cluster.write_file("deadline.yaml", &manifest("web", "dev", extra))?;
    let run = deploy(f, &m, &["--release", "h2", "--timeout", "2s"], 5).await?;
    eprintln!("a deployment with --timeout 2s ended after {:?}", run.elapsed);
    ensure!(run.elapsed >= Duration::from_secs(2), "it ended before its deadline: {:?}", run.elapsed);
    ensure!(run.elapsed < Duration::from_secs(10), "deploy --timeout 2s returned after {:?}", run.elapsed);
    let d2 = run.deployment()?;
    ensure!(d2.state == DeployState::Cancelled && d2.timed_out && run.result()?.exit_code == 5, "{run}");
    let tr = transitions(&d2);
    ensure!(tr == ["queued", "running", "cancelling", "cancelled"], "events: {tr:?}");
    let why = &event(&d2, "cancelling")?.reason;
    ensure!(why.contains("deadline"), "the cancel does not name the deadline: {why:?}");
    let hook = &steps(&d2)[0];
    ensure!(status(hook) == "failed", "the hook cut off by the deadline is {}", status(hook));
    for (i, s) in steps(&d2).iter().enumerate().skip(1) {
        ensure!(status(s) == "pending", "step {i} ({}) ran after the deadline: {}", kind(s), status(s));
    }
    let tries = witness_of(f, &id_of(&d2))?;
    ensure!(tries.len() == 1 && !tries[0].ok, "witness of the cut-off hook: {tries:?}");
    let cut_at = tries[0].end_ms - d2.submitted_ms;
    ensure!((2_000..7_000).contains(&cut_at), "the hook was stopped {cut_at} ms after submission (deadline 2 s)");
    assert_no_process_matching(f, "sleep 60").await?;
    let dev = destination(f, "dev").await?;
    ensure!(dev.lock_holder.is_none() && dev.queued.is_empty(), "destination after the deadline: {dev:?}");
    assert_witness_safe(&f.witness()?, &[&d, &d2])?;
    Ok(())
}

// ------------------------------------------------------ 3. queue policies

const POLICIES: &str = "destinations:
  - name: rj
    selector: { env: dev }
    queue: reject
  - name: co
    selector: { env: dev }
    queue: coalesce
  - name: qu
    selector: { env: dev }
    queue: queue
";

#[tokio::test(flavor = "multi_thread")]
async fn queue_policies_lock_wait_and_idempotency() {
    let f = Fleet::start(&one_node(), POLICIES).await.expect("cluster with a node");
    let r = policies(&f).await;
    f.finish(r);
}

async fn lock(f: &Fleet, verb: &str, dest: &str) -> anyhow::Result<()> {
    let args: Vec<&str> = if verb == "acquire" { vec!["lock", "acquire", dest, "-m", "maintenance"] } else { vec!["lock", verb, dest] };
    f.cluster.ctl(&args).await?.expect_code(0)?;
    Ok(())
}

async fn policies(f: &Fleet) -> anyhow::Result<()> {
    let rj = f.cluster.write_file("rj.yaml", &manifest("rapp", "rj", ""))?;
    let qu = f.cluster.write_file("qu.yaml", &manifest("qapp", "qu", ""))?;

    // --- reject: busy → exit 7, nothing created.
    lock(f, "acquire", "rj").await?;
    let before = list_ids(f).await?;
    let run = f.cluster.deploy(&rj, &["--release", "r1"]).await?;
    run.expect_code(7)?;
    let lines = run.lines()?;
    let err = lines
        .iter()
        .find_map(|l| match l {
            Line::Error(e) => Some(e),
            _ => None,
        })
        .with_context(|| format!("no JSON error line: {run}"))?;
    ensure!(err.exit_code == 7, "the JSON error line's exit_code: {run}");
    ensure!(run.text().contains("reject"), "the refusal does not name the `reject` policy: {run}");
    ensure!(!lines.iter().any(|l| matches!(l, Line::Submitted(_) | Line::Result(_))), "a rejected deploy submitted something: {run}");
    ensure!(list_ids(f).await? == before, "a rejected deployment was recorded");
    let dest = destination(f, "rj").await?;
    ensure!(dest.queued.is_empty(), "rj's queue after a rejection: {dest:?}");
    let holder = dest.lock_holder.context("rj should still be locked")?;
    ensure!(!holder.starts_with("deployment/"), "rj's lock moved to {holder}");
    lock(f, "release", "rj").await?;
    let ok = deploy(f, &rj, &["--release", "r2"], 0).await?;
    ensure!(ok.deployment()?.state == DeployState::Succeeded, "rj once free: {ok}");

    // --- --lock-wait 1s while the lock is held: exit 5, cancelled, timed out.
    lock(f, "acquire", "qu").await?;
    let run = deploy(f, &qu, &["--release", "w1", "--lock-wait", "1s"], 5).await?;
    eprintln!("--lock-wait 1s gave up after {:?}", run.elapsed);
    let waited = run.deployment()?;
    ensure!(waited.state == DeployState::Cancelled && waited.timed_out, "{run}");
    ensure!(transitions(&waited) == ["queued", "cancelling", "cancelled"], "events: {:?}", transitions(&waited));
    let gave_up = event_at(&waited, "cancelling")? - waited.submitted_ms;
    ensure!((1_000..5_000).contains(&gave_up), "it gave up {gave_up} ms after submission (lock wait 1 s)");
    ensure!(steps(&waited).iter().all(|s| status(s) == "pending"), "a deployment that never got the lock ran steps: {}", show(&waited));
    ensure!(witness_of(f, &id_of(&waited))?.is_empty(), "a deployment that never got the lock acted");

    // --- `lock queue` lists the waiting deployments in order; after the
    // release they run in that order, one at a time.
    let mut queued = vec![];
    for r in ["q1", "q2", "q3"] {
        queued.push(submit(f, &qu, &["--release", r]).await?);
    }
    let q = lock_queue(f, "qu").await?;
    ensure!(queue_ids(&q) == queued, "lock queue qu lists {:?}, submitted {queued:?}: {}", queue_ids(&q), show_queue(&q));
    ensure!(q.queue.iter().all(|d| d.state == DeployState::Queued), "not all queued: {}", show_queue(&q));
    ensure!(q.lock_holder.as_deref().is_some_and(|h| !h.starts_with("deployment/")), "qu's lock holder: {}", show_queue(&q));
    lock(f, "release", "qu").await?;
    let mut ran = vec![];
    for id in &queued {
        ran.push(watch(f, id, 0).await?);
    }
    for w in ran.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        ensure!(event_at(a, "succeeded")? <= event_at(b, "running")?, "{} started before {} ended", b.id, a.id);
        ensure!(a.token.is_some() && a.token < b.token, "tokens do not grow: {:?} then {:?}", a.token, b.token);
        ensure!(
            b.previous_release.as_deref() == Some(a.release.as_str()),
            "{} replaced {:?} instead of {}",
            b.id,
            b.previous_release,
            a.release
        );
    }

    // --- coalesce, the lock held by a running deployment: of the two that
    // wait, the older is superseded by the newer; the first and the last run,
    // in order.
    let gate = f.cluster.path().join("gate");
    let gate_hook = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let co = f
        .cluster
        .write_file("co.yaml", &manifest("capp", "co", &format!("hooks: {{ pre: {} }}\nstep_timeout: 60s\n", yaml_list(&[&gate_hook]))))?;
    let c1 = submit(f, &co, &["--release", "c1"]).await?;
    eventually(&format!("{c1} to hold co"), Duration::from_secs(20), || async {
        Ok((f.cluster.deployment(&c1).await?.state == DeployState::Running).then_some(()))
    })
    .await?;
    let c2 = submit(f, &co, &["--release", "c2"]).await?;
    let c3 = submit(f, &co, &["--release", "c3"]).await?;
    let d2 = f.cluster.deployment(&c2).await?;
    ensure!(d2.state == DeployState::Superseded, "{c2} should be superseded by {c3}: {}", d2.state);
    let why = &event(&d2, "superseded")?.reason;
    ensure!(why.contains(&c3), "the supersede event does not name {c3}: {why:?}");
    let q = lock_queue(f, "co").await?;
    ensure!(queue_ids(&q) == [c1.clone(), c3.clone()], "lock queue co: {}", show_queue(&q));
    std::fs::write(&gate, "open")?;
    let (w1, w2, w3) = tokio::join!(watch(f, &c1, 0), watch(f, &c2, 4), watch(f, &c3, 0));
    let (d1, d2, d3) = (w1?, w2?, w3?);
    ensure!(d2.state == DeployState::Superseded && steps(&d2).is_empty(), "{c2}: {}", show(&d2));
    ensure!(witness_of(f, &c2)?.is_empty(), "the superseded {c2} acted");
    ensure!(event_at(&d1, "succeeded")? <= event_at(&d3, "running")?, "{c3} started before {c1} ended");
    ensure!(d3.previous_release.as_deref() == Some("c1"), "{c3} replaced {:?}", d3.previous_release);

    // --- coalesce, the lock held by a person: every waiting deployment of
    // the app is superseded by the next one (DESIGN.md: "a queued deployment
    // superseded by a newer one of the same app is marked superseded"), so
    // after the release only the newest runs.
    lock(f, "acquire", "co").await?;
    let mut waiting = vec![];
    for r in ["m1", "m2", "m3"] {
        waiting.push(submit(f, &co, &["--release", r]).await?);
    }
    let q = lock_queue(f, "co").await?;
    ensure!(queue_ids(&q) == [waiting[2].clone()], "lock queue co under a manual lock: {}", show_queue(&q));
    lock(f, "release", "co").await?;
    let (m1, m2, m3) = tokio::join!(watch(f, &waiting[0], 4), watch(f, &waiting[1], 4), watch(f, &waiting[2], 0));
    let (m1, m2, m3) = (m1?, m2?, m3?);
    ensure!(
        m1.state == DeployState::Superseded && m2.state == DeployState::Superseded && m3.state == DeployState::Succeeded,
        "{}\n{}\n{}",
        show(&m1),
        show(&m2),
        show(&m3)
    );
    ensure!(m3.previous_release.as_deref() == Some("c3"), "{} replaced {:?}", m3.id, m3.previous_release);

    // --- idempotency key: the same deployment twice, one record.
    let before = list_ids(f).await?;
    let first = deploy(f, &qu, &["--release", "k1", "--idempotency-key", "ci-run-42"], 0).await?;
    let again = deploy(f, &qu, &["--release", "k1", "--idempotency-key", "ci-run-42"], 0).await?;
    let detached = submit(f, &qu, &["--release", "k1", "--idempotency-key", "ci-run-42"]).await?;
    ensure!(first.id()? == again.id()? && again.id()? == detached, "same key, different ids: {} {} {detached}", first.id()?, again.id()?);
    let after = list_ids(f).await?;
    ensure!(
        after.len() == before.len() + 1 && after[0] == first.id()?,
        "list after two submits with one key: {after:?} (before {before:?})"
    );

    // --- dry run: a plan, nothing created, nothing done.
    let witness_before = f.witness()?.len();
    let run = f.cluster.deploy(&qu, &["--release", "dry", "--dry-run"]).await?;
    run.expect_code(0)?;
    let lines = run.lines()?;
    let plan = lines
        .iter()
        .find_map(|l| match l {
            Line::Plan(p) => Some(&p.deployment),
            _ => None,
        })
        .with_context(|| format!("no plan line: {run}"))?;
    let planned = steps(plan);
    ensure!(planned.len() == 4 && planned.iter().all(|s| status(s) == "pending" && s.plan.node == "node-1"), "the plan: {}", show(plan));
    ensure!(!lines.iter().any(|l| matches!(l, Line::Submitted(_) | Line::Result(_))), "a dry run submitted: {run}");
    ensure!(list_ids(f).await? == after, "a dry run created a deployment");
    ensure!(f.witness()?.len() == witness_before, "a dry run made a node act");
    let dest = destination(f, "qu").await?;
    ensure!(dest.lock_holder.is_none() && dest.current.get("qapp").map(String::as_str) == Some("k1"), "qu after the dry run: {dest:?}");

    let w = f.witness()?;
    assert_witness_safe(&w, &[&d1, &d3, &m3])?;
    Ok(())
}

// -------------------------------------------- 4. kill -9 of the leader ×20

const KILL_ROUNDS: usize = 20;
const KILL_SEED: u64 = 0xF1EE7;

#[tokio::test(flavor = "multi_thread")]
async fn leader_kill9_mid_deploy_loses_nothing() {
    let mut f = Fleet::start(&two_nodes(), DEV).await.expect("cluster with two nodes");
    let r = kill_leader_rounds(&mut f).await;
    f.finish(r);
}

async fn kill_leader_rounds(f: &mut Fleet) -> anyhow::Result<()> {
    let began = Instant::now();
    // Five short hooks per node: ten hook steps, then the blue-green steps
    // on two nodes: 18 steps, each committed before the next.
    let hooks = ["sleep 0.2"; 5];
    let m = f.cluster.write_file("web.yaml", &manifest("web", "dev", &format!("hooks: {{ pre: {} }}\n", yaml_list(&hooks))))?;
    let n_steps = 2 * hooks.len() + 8;
    let mut rng = StdRng::seed_from_u64(KILL_SEED);
    let mut progress = vec![]; // kill → first step started after it finishes
    let mut dispatch = vec![]; // kill → first step started after it starts
    let mut ids = vec![];
    let mut last = None;
    for round in 1..=KILL_ROUNDS {
        let leader = f.cluster.leader_id().await?;
        let release = format!("v{round}");
        let id = submit(f, &m, &["--release", &release]).await?;
        // Followed at once, as CI does (`id=$(fleetctl deploy --detach) &&
        // fleetctl watch "$id"`): any coordinator must know an acknowledged
        // deployment, the one restarted in the round before included.
        let watcher = f.cluster.spawn_ctl(&["watch", &id, "-o", "json"])?;
        // A random point: after `k` actions of this deployment ended, plus
        // up to 150 ms (k = 0: right after the submit, maybe before the grant).
        let k = rng.random_range(0..=n_steps - 5);
        let extra = Duration::from_millis(rng.random_range(0..150));
        eventually(&format!("{id} to finish {k} actions"), Duration::from_secs(60), || async {
            Ok((witness_of(f, &id)?.len() >= k).then_some(()))
        })
        .await?;
        tokio::time::sleep(extra).await; // the random kill point, not a wait for anything
        let killed_ms = now_ms();
        let killed = Instant::now();
        f.cluster.kill9(leader)?;
        // The survivors elect a leader; then the dead one comes back (a
        // crashed process does not return within an election timeout).
        let survivors: Vec<u64> = f.cluster.coords.keys().copied().filter(|i| *i != leader).collect();
        let new_leader = eventually("a new leader among the survivors", Duration::from_secs(20), || async {
            for id in &survivors {
                if let Ok(s) = f.cluster.local_status(*id).await {
                    if s.leader_id != 0 && s.leader_id != leader {
                        return Ok(Some(s.leader_id));
                    }
                }
            }
            Ok(None)
        })
        .await?;
        let elected_after = killed.elapsed();
        f.cluster.restart(leader)?;
        let run = watcher.await.context("the watch task")??;
        let d = match run.code {
            0 => run.deployment()?,
            _ => anyhow::bail!("round {round}: {id} after kill -9 of leader {leader}: {run}"),
        };
        ensure!(d.state == DeployState::Succeeded, "round {round}: {id} ended {}", d.state);
        ensure!(event_at(&d, "succeeded")? > killed_ms, "round {round}: {id} had already ended when the leader was killed");
        ensure!(d.epoch == 1, "round {round}: a node was declared lost after the failover (epoch {}): {:?}", d.epoch, d.events);
        for (i, s) in steps(&d).iter().enumerate() {
            ensure!(
                status(s) == "done" && s.attempt == 1,
                "round {round}: step {i} ({}) is {} at attempt {}",
                s.plan.name,
                status(s),
                s.attempt
            );
        }
        let lines = witness_of(f, &id)?;
        let first = lines.iter().filter(|l| l.start_ms >= killed_ms).min_by_key(|l| l.start_ms);
        let (p, s) = match first {
            Some(l) => (l.end_ms - killed_ms, l.start_ms - killed_ms),
            // Every action had started before the kill: progress is the commit of the end.
            None => {
                let t = event_at(&d, "succeeded")? - killed_ms;
                (t, t)
            }
        };
        eprintln!(
            "round {round:2}: killed leader {leader} after {k} actions +{} ms; {new_leader} led after {} ms; \
             next step started {s} ms and finished {p} ms after the kill; {id} took {} ms",
            extra.as_millis(),
            elected_after.as_millis(),
            event_at(&d, "succeeded")? - d.submitted_ms
        );
        progress.push(p);
        dispatch.push(s);
        ids.push(id);
        last = Some(d);
    }

    // None lost, all succeeded.
    let listed = list_ids(f).await?;
    for id in &ids {
        ensure!(listed.contains(id), "{id} is missing from `list`");
    }
    let mut all = vec![];
    for id in &ids {
        let d = f.cluster.deployment(id).await?;
        ensure!(d.state == DeployState::Succeeded, "{id} is {}", d.state);
        all.push(d);
    }
    // No two actions overlapped on the destination; tokens never went back;
    // no step attempt ran twice; each action carried its deployment's token.
    let witness = f.witness()?;
    assert_witness_safe(&witness, &all.iter().collect::<Vec<_>>())?;
    let mut tokens: Vec<u64> =
        all.iter().map(|d| d.token.with_context(|| format!("{} succeeded without a token", d.id))).collect::<anyhow::Result<_>>()?;
    ensure!(tokens.windows(2).all(|w| w[0] < w[1]), "tokens of consecutive deployments do not grow: {tokens:?}");
    tokens.dedup();
    ensure!(tokens.len() == KILL_ROUNDS, "deployments share a token: {tokens:?}");
    // The last release serves, and nothing else is left running.
    let dev = destination(f, "dev").await?;
    ensure!(dev.current.get("web") == Some(&format!("v{KILL_ROUNDS}")) && dev.lock_holder.is_none(), "destination: {dev:?}");
    assert_only_instances_of(f, last.as_ref().context("no round ran")?).await?;

    progress.sort_unstable();
    dispatch.sort_unstable();
    eprintln!(
        "failover (kill -9 of the leader → next step finished), {KILL_ROUNDS} rounds: p50 {} ms, p99 {} ms, max {} ms; \
         (→ next step started: p50 {} ms, p99 {} ms); whole test {:?}",
        percentile(&progress, 50.0),
        percentile(&progress, 99.0),
        progress.last().copied().unwrap_or(0),
        percentile(&dispatch, 50.0),
        percentile(&dispatch, 99.0),
        began.elapsed()
    );
    if percentile(&progress, 99.0) > 3_000 {
        eprintln!("NOTE: failover p99 is above the 3 s aim");
    }
    Ok(())
}

// ------------------------------------------------ 5. paused (stale) leader

/// How long the leader stays stopped: ten election timeouts (shorter than
/// the 5 s node lease), then a stall as long as a bad GC pause or a VM
/// migration (longer than the lease).
const PAUSES: [Duration; 2] = [Duration::from_secs(3), Duration::from_secs(8)];

#[tokio::test(flavor = "multi_thread")]
async fn paused_leader_changes_nothing_when_it_wakes() {
    let f = Fleet::start(&two_nodes(), DEV).await.expect("cluster with two nodes");
    let r = paused_leader(&f).await;
    f.finish(r);
}

/// What must be the same in two runs of the same manifest.
fn shape(d: &Deployment) -> Vec<(String, String, &'static str, u32)> {
    steps(d).iter().map(|s| (s.plan.node.clone(), kind(s), status(s), s.attempt)).collect()
}

async fn paused_leader(f: &Fleet) -> anyhow::Result<()> {
    let hooks = ["sleep 0.2"; 4];
    let m = f.cluster.write_file("web.yaml", &manifest("web", "dev", &format!("hooks: {{ pre: {} }}\n", yaml_list(&hooks))))?;
    // v1 so that every run below replaces something; v2 is the clean run.
    deploy(f, &m, &["--release", "v1"], 0).await?;
    let clean = deploy(f, &m, &["--release", "v2"], 0).await?.deployment()?;
    let clean_dest = destination(f, "dev").await?;
    let mut previous = "v2".to_string();
    let mut ended = vec![clean.clone()];
    for (i, pause) in PAUSES.iter().enumerate() {
        let release = format!("v{}", i + 3);
        let d = paused_run(f, &m, &release, *pause).await?;
        ended.push(d.clone());
        // The same outcome as the clean run: the same steps done at the same
        // attempts, the same lifecycle, the same epoch; the destination shows
        // this release where the clean run left v2, and nothing else differs.
        let id = id_of(&d);
        ensure!(
            shape(&d) == shape(&clean),
            "{id} (leader stopped {pause:?}): steps differ from the clean run:\n  paused: {:?}\n  clean:  {:?}\n  events: {:?}",
            shape(&d),
            shape(&clean),
            d.events
        );
        ensure!(transitions(&d) == transitions(&clean), "{id}: events differ: {:?} vs {:?}", transitions(&d), transitions(&clean));
        ensure!(d.epoch == clean.epoch, "{id}: epoch {} vs {} in the clean run: {:?}", d.epoch, clean.epoch, d.events);
        ensure!(d.previous_release.as_deref() == Some(previous.as_str()), "{id} replaced {:?} instead of {previous}", d.previous_release);
        let mut want_dest = clean_dest.clone();
        want_dest.current.insert("web".into(), release.clone());
        let dest = destination(f, "dev").await?;
        ensure!(
            dest == want_dest,
            "destination after {id}:\n  {dest:?}\nexpected (as after the clean run, {release} current):\n  {want_dest:?}"
        );
        assert_only_instances_of(f, &d).await?;
        eprintln!("{id}: leader stopped for {pause:?}: same outcome as the clean run");
        previous = release;
    }
    // Nothing overlapped, no token went back, no attempt ran twice.
    let witness = f.witness()?;
    assert_witness_safe(&witness, &ended.iter().collect::<Vec<_>>())?;
    Ok(())
}

/// Deploy `release`, stop the leader mid-deploy for `pause`, wake it; the
/// deployment as it ended.
async fn paused_run(f: &Fleet, m: &Path, release: &str, pause: Duration) -> anyhow::Result<Deployment> {
    let leader = f.cluster.leader_id().await?;
    let id = submit(f, m, &["--release", release]).await?;
    let watcher = f.cluster.spawn_ctl(&["watch", &id, "-o", "json"])?;
    eventually(&format!("{id} to be under way"), Duration::from_secs(30), || async { Ok((witness_of(f, &id)?.len() >= 3).then_some(())) })
        .await?;
    f.cluster.signal(leader, "STOP")?;
    let stopped = Instant::now();
    let stopped_ms = now_ms();
    let others: Vec<u64> = f.cluster.coords.keys().copied().filter(|i| *i != leader).collect();
    let elected = eventually("a new leader while the old one is stopped", Duration::from_secs(20), || async {
        for id in &others {
            if let Ok(s) = f.cluster.local_status(*id).await {
                if s.leader_id != 0 && s.leader_id != leader {
                    return Ok(Some((s.leader_id, stopped.elapsed())));
                }
            }
        }
        Ok(None)
    })
    .await;
    if let Some(left) = pause.checked_sub(stopped.elapsed()) {
        tokio::time::sleep(left).await; // the length of the fault, not a wait for anything
    }
    let woke_ms = now_ms();
    f.cluster.signal(leader, "CONT")?;
    let (new_leader, after) = elected?;
    eprintln!("{id}: leader {leader} stopped for {:?}; {new_leader} was leader {after:?} after the stop", stopped.elapsed());

    // The woken coordinator learns that it no longer leads.
    eventually(&format!("coordinator {leader} to follow the new leader"), Duration::from_secs(20), || async {
        let s = f.cluster.local_status(leader).await?;
        Ok((s.leader_id != 0 && s.leader_id != leader).then_some(()))
    })
    .await?;
    let run = watcher.await.context("the watch task")??;
    run.expect_code(0)?;
    let d = run.deployment()?;
    ensure!(d.state == DeployState::Succeeded, "{id}: {run}");
    let end = event_at(&d, "succeeded")?;
    ensure!(end > stopped_ms, "{id} had ended before the leader was stopped");
    eprintln!("{id} ended {} ms after the leader woke", end - woke_ms);
    // After the stale leader woke, nothing but this deployment acted.
    let late: Vec<WitnessLine> = f.witness()?.into_iter().filter(|l| l.start_ms >= woke_ms && l.deployment != d.id).collect();
    ensure!(late.is_empty(), "actions of other deployments after the stale leader woke: {late:?}");
    Ok(d)
}
