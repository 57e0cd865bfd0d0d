//! Slow and failing disks under the coordinators (issue 12). The failpoints
//! in the Raft log's write and fsync paths (`fleet-coord`'s `failpoints`
//! feature, on in the workspace's test build) are set at run time through
//! `<data-dir>/failpoints`; each coordinator confirms what it applied in
//! `failpoints.applied`.
//!
//! What must hold: a write is acknowledged only once a majority fsynced it
//! (a slow fsync everywhere slows every acknowledgement down; a failing
//! fsync everywhere means no acknowledgement at all), and a coordinator
//! whose disk fails stops serving instead of going on without storing. The
//! broken build `cargo xtask mutants` makes (`mutation-ack-before-fsync`)
//! must fail these tests.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use fleet_proto::LockOutcome;
use fleet_tests::harness::{acquire, eventually, lock_status, Cluster, FAST_RAFT};

const SLOW_FSYNC_MS: u64 = 250;

/// Clear the failpoints of a coordinator that is not running (read at start).
fn clear_failpoints(cluster: &Cluster, id: u64) -> anyhow::Result<()> {
    Ok(std::fs::write(cluster.coords[&id].spec.data_dir().join("failpoints"), "")?)
}

fn exited(cluster: &mut Cluster, id: u64) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let coord = cluster.coords.get_mut(&id).context("no such coordinator")?;
    match coord.child.as_mut() {
        Some(child) => Ok(child.try_wait()?),
        None => bail!("coordinator {id} was never started or was killed by the test"),
    }
}

async fn granted(cluster: &Cluster, dest: &str) -> anyhow::Result<u64> {
    let mut c = cluster.client("operator")?;
    let reply = acquire(&mut c, dest, "disk test", &format!("rid-{dest}")).await?;
    ensure!(reply.outcome() == LockOutcome::Granted, "lock {dest}: {reply:?}");
    Ok(reply.applied_index)
}

async fn held(cluster: &Cluster, dest: &str) -> anyhow::Result<bool> {
    let mut c = cluster.client("operator")?;
    Ok(!lock_status(&mut c, dest).await?.locks.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fsync_everywhere_delays_every_acknowledgement_and_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, FAST_RAFT).await?;
    granted(&cluster, "before").await?;
    for id in 1..=3 {
        cluster.set_failpoints(id, &format!("raft-log-fsync=sleep({SLOW_FSYNC_MS})\n")).await?;
    }
    // Every acknowledgement waits for a majority's fsync, so none can come
    // sooner than one slow fsync (an acknowledgement before the fsync would).
    let mut took = vec![];
    for i in 0..4 {
        let started = Instant::now();
        granted(&cluster, &format!("slow-{i}")).await?;
        took.push(started.elapsed());
    }
    eprintln!("acknowledgements with a {SLOW_FSYNC_MS} ms fsync on every coordinator: {took:?}");
    for (i, t) in took.iter().enumerate() {
        ensure!(
            *t >= Duration::from_millis(SLOW_FSYNC_MS),
            "write slow-{i} was acknowledged after {t:?}, before any coordinator's {SLOW_FSYNC_MS} ms fsync could end: acknowledged before it was stored"
        );
    }
    // Acknowledged means stored: kill -9 everything and read it back.
    for id in 1..=3 {
        cluster.kill9(id)?;
        clear_failpoints(&cluster, id)?;
    }
    for id in 1..=3 {
        cluster.restart(id)?;
    }
    for dest in ["before", "slow-0", "slow-1", "slow-2", "slow-3"] {
        ensure!(held(&cluster, dest).await?, "the acknowledged lock {dest} is gone after kill -9 of every coordinator");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fsync_everywhere_acknowledges_nothing_and_stops_the_coordinators() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, FAST_RAFT).await?;
    granted(&cluster, "before").await?;
    for id in 1..=3 {
        cluster.set_failpoints(id, "raft-log-fsync=return\n").await?;
    }
    let mut c = cluster.client("operator")?;
    c.retry_for = Duration::from_secs(5);
    let answer = tokio::time::timeout(Duration::from_secs(20), acquire(&mut c, "after", "must not be acknowledged", "rid-after")).await;
    if let Ok(Ok(reply)) = &answer {
        bail!("a write was acknowledged while no coordinator could fsync: {reply:?}");
    }
    eprintln!("write with every fsync failing: {:?}", answer.map(|r| r.map(|_| ()).map_err(|e| format!("{e:#}"))));
    // The coordinators that tried to store it stop serving (a majority: the
    // leader, and whoever is elected after it and appends).
    let stopped = eventually("a majority of coordinators to stop on the failed fsync", Duration::from_secs(60), || {
        let mut gone = vec![];
        let mut result = Ok(None);
        for id in 1..=3 {
            match exited(&mut cluster, id) {
                Ok(Some(status)) => gone.push((id, status)),
                Ok(None) => {}
                Err(e) => result = Err(e),
            }
        }
        if gone.len() >= 2 {
            result = Ok(Some(gone));
        }
        async move { result }
    })
    .await?;
    for (id, status) in &stopped {
        ensure!(!status.success(), "coordinator {id} stopped with {status} on a failed fsync; it must exit non-zero");
        let log = cluster.log_of(*id);
        ensure!(
            log.contains("stopped serving rather than acknowledge") && log.contains("check the disk under"),
            "coordinator {id}'s last words do not say what happened and what to do:\n{log}"
        );
    }
    // Disks repaired: every coordinator back, nothing acknowledged is lost.
    for id in 1..=3 {
        if exited(&mut cluster, id)?.is_none() {
            cluster.kill9(id)?;
        }
        clear_failpoints(&cluster, id)?;
    }
    for id in 1..=3 {
        cluster.restart(id)?;
    }
    ensure!(held(&cluster, "before").await?, "the lock acknowledged before the disks failed is gone");
    granted(&cluster, "repaired").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_its_coordinator_and_the_others_go_on() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, FAST_RAFT).await?;
    let leader = cluster.status().await?.leader_id;
    let follower = (1..=3).find(|id| *id != leader).context("no follower")?;

    // A follower's disk fills up: it stops, the other two acknowledge.
    cluster.set_failpoints(follower, "raft-log-append=return(no space left on device)\n").await?;
    let mut last = 0;
    for i in 0..3 {
        last = granted(&cluster, &format!("full-follower-{i}")).await?;
    }
    let status = eventually("the follower with the full disk to stop", Duration::from_secs(30), || {
        let r = exited(&mut cluster, follower);
        async move { r }
    })
    .await?;
    ensure!(!status.success(), "coordinator {follower} exited {status}");
    let log = cluster.log_of(follower);
    ensure!(log.contains("no space left on device") && log.contains("check the disk under"), "coordinator {follower}'s log:\n{log}");
    // Space freed, restarted: it catches up on what it missed.
    clear_failpoints(&cluster, follower)?;
    cluster.restart(follower)?;
    eventually("the restarted follower to catch up", Duration::from_secs(30), || async {
        Ok((cluster.local_status(follower).await?.applied_index >= last).then_some(()))
    })
    .await?;

    // The leader's disk fills up: it stops, another is elected, and the
    // client's retried write lands there once.
    cluster.set_failpoints(leader, "raft-log-append=return(no space left on device)\n").await?;
    granted(&cluster, "full-leader").await?;
    let status = eventually("the leader with the full disk to stop", Duration::from_secs(30), || {
        let r = exited(&mut cluster, leader);
        async move { r }
    })
    .await?;
    ensure!(!status.success(), "coordinator {leader} exited {status}");
    let now = cluster.status().await?;
    ensure!(now.leader_id != leader && now.leader_id != 0, "no new leader after {leader} stopped: {now:?}");
    for dest in ["full-follower-0", "full-follower-1", "full-follower-2", "full-leader"] {
        ensure!(held(&cluster, dest).await?, "acknowledged lock {dest} is missing");
    }
    Ok(())
}
