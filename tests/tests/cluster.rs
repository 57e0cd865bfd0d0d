//! Coordinator cluster: formation, failover, durability under kill -9,
//! snapshots and membership, authentication, linearizable locks.
//!
//! Every test starts real `fleet-coord` processes (build them first:
//! `cargo build --bins`, or run everything with `cargo xtask test`).

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::*;
use fleet_tests::harness::{acquire, eventually, lock_status, release, Cluster, FAST_RAFT};
use fleet_tests::json::{ClusterStatusView, LockReplyView};

/// fleetctl's `-o json` output, read as `T`.
fn json_of<T: serde::de::DeserializeOwned>(out: &std::process::Output) -> anyhow::Result<T> {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| {
        anyhow::anyhow!(
            "fleetctl printed no {} JSON ({e}): {text}\nstderr: {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn three_coordinators_form_one_cluster() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, FAST_RAFT).await?;
    let out = cluster.fleetctl("operator", &["cluster", "status", "-o", "json"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: ClusterStatusView = json_of(&out)?;
    let members = &v.members;
    assert_eq!(members.len(), 3, "{v:?}");
    assert_eq!(members.iter().filter(|m| m.kind == "voter").count(), 3, "{v:?}");
    assert_eq!(members.iter().filter(|m| m.role == "leader").count(), 1, "{v:?}");
    let leader = members.iter().find(|m| m.role == "leader").map(|m| m.id);
    assert!(leader.is_some() && v.leader_id == leader, "{v:?}");
    assert!(v.term >= 1);
    // Text output names the leader too.
    let out = cluster.fleetctl("operator", &["cluster", "status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("leader") && text.contains("voter"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_leader_then_locks_continue_through_the_address_list() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, FAST_RAFT).await?;
    let out = cluster.fleetctl("operator", &["lock", "acquire", "web", "-m", "before failover", "-o", "json"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first: LockReplyView = json_of(&out)?;
    let first_token = first.lock.as_ref().map(|l| l.fencing_token).expect("a granted lock carries its token");

    let old_leader = cluster.status().await?.leader_id;
    cluster.kill9(old_leader)?;

    // The same address list, dead leader included: fleetctl must find the new leader.
    let out = cluster.fleetctl("operator", &["lock", "release", "web", "-o", "json"])?;
    assert!(out.status.success(), "release after failover: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_of::<LockReplyView>(&out)?.outcome, "released");
    let out = cluster.fleetctl("operator", &["lock", "acquire", "db", "-m", "after failover", "-o", "json"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: LockReplyView = json_of(&out)?;
    assert_eq!(v.outcome, "granted");
    assert!(v.lock.as_ref().is_some_and(|l| l.fencing_token > first_token), "tokens grow across leaders: {v:?}");

    let status = cluster.status().await?;
    assert_ne!(status.leader_id, old_leader);
    assert_ne!(status.leader_id, 0);
    Ok(())
}

/// `fleet_raft_fast_elections_total` on coordinator `id`'s `/metrics`.
async fn fast_elections(cluster: &Cluster, id: u64) -> anyhow::Result<f64> {
    let h = fleet_tests::https::Https::new(cluster, id, "operator")?;
    let a = h.get("/metrics").await?;
    a.expect(200)?;
    a.body
        .lines()
        .find_map(|l| l.strip_prefix("fleet_raft_fast_elections_total "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("coordinator {id}'s /metrics has no fleet_raft_fast_elections_total:\n{}", a.body))
}

/// When the leader's process dies, its followers' `Leading` streams break
/// and the first of them stands for election as soon as the leader lease
/// has run out, not after its own randomized timer on top; while the
/// leader lives, no follower does.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_leaders_follower_stands_once_the_lease_runs_out() -> anyhow::Result<()> {
    // A 2 s lease: openraft's own timer would wait 3-4 s after the last heartbeat.
    let mut cluster = Cluster::start(3, &["--heartbeat-ms", "50", "--election-timeout-ms", "1000"]).await?;
    let mut c = cluster.client("operator")?;
    acquire(&mut c, "web", "before", "fast-1").await?;
    let before = cluster.status().await?;
    let old = before.leader_id;
    let followers: Vec<u64> = cluster.coords.keys().copied().filter(|id| *id != old).collect();
    for id in cluster.coords.keys() {
        let n = fast_elections(&cluster, *id).await?;
        assert_eq!(n, 0.0, "coordinator {id} stood for election under a live leader");
    }
    cluster.kill9(old)?;
    let after = eventually("a new leader", Duration::from_secs(30), || async {
        let s = cluster.status().await?;
        Ok((s.leader_id != 0 && s.leader_id != old).then_some(s))
    })
    .await?;
    let mut fast = 0.0;
    for id in &followers {
        fast += fast_elections(&cluster, *id).await?;
    }
    assert!(fast >= 1.0, "no follower took the fast path; logs:\n{}", followers.iter().map(|id| cluster.log_of(*id)).collect::<String>());
    let log = cluster.log_of(after.leader_id);
    assert!(log.contains("standing for election"), "the new leader's log says why it stood:\n{log}");
    // The lowest-ranked follower goes first and wins in one round.
    assert_eq!(after.term, before.term + 1, "one election round, not a split vote");
    // And the cluster serves: the lock taken before is still held, a new one is granted.
    acquire(&mut c, "db", "after", "fast-2").await?;
    let held = lock_status(&mut c, "web").await?;
    assert!(held.locks.iter().any(|l| l.destination == "web"), "the lock granted before the failover is still held: {held:?}");
    Ok(())
}

/// One logical operation with the request id it was sent with.
#[derive(Debug, Clone)]
struct Op {
    acquire: bool,
    dest: String,
    id: String,
}

async fn send(c: &mut fleetctl::client::Client, op: &Op) -> anyhow::Result<LockReply> {
    if op.acquire {
        acquire(c, &op.dest, "durability", &op.id).await
    } else {
        release(c, &op.dest, &op.id).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_every_coordinator_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, FAST_RAFT).await?;
    let ops: Vec<Op> = (0..400).map(|i| Op { acquire: (i / 8) % 2 == 0, dest: format!("d{}", i % 8), id: format!("op-{i}") }).collect();

    // A client applies operations in order while every coordinator is killed.
    let mut writer = cluster.client("operator")?;
    writer.retry_for = Duration::from_millis(500);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, LockReply)>();
    let ops_for_writer = ops.clone();
    let writer_task = tokio::spawn(async move {
        for (i, op) in ops_for_writer.iter().enumerate() {
            match send(&mut writer, op).await {
                Ok(reply) => {
                    if ack_tx.send((i, reply)).is_err() {
                        return i;
                    }
                }
                Err(_) => return i, // in flight when the cluster died: outcome unknown
            }
        }
        ops_for_writer.len()
    });

    let mut acked: Vec<LockReply> = Vec::new();
    while acked.len() < 60 {
        let (i, reply) = ack_rx.recv().await.expect("writer stopped early");
        assert_eq!(i, acked.len());
        acked.push(reply);
    }
    for id in [1, 2, 3] {
        cluster.kill9(id)?;
    }
    let in_flight = writer_task.await?;
    while let Ok((i, reply)) = ack_rx.try_recv() {
        assert_eq!(i, acked.len());
        acked.push(reply);
    }
    assert_eq!(in_flight, acked.len(), "the writer stops at the first unanswered op");

    for id in [1, 2, 3] {
        cluster.restart(id)?;
    }
    let mut c = cluster.client("operator")?;
    // Finish the op that was in flight: applied at most once, whatever happened.
    if in_flight < ops.len() {
        let reply = send(&mut c, &ops[in_flight]).await?;
        acked.push(reply);
    }

    // Expected state from the acknowledged answers alone.
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (op, reply) in ops.iter().zip(&acked) {
        match reply.outcome() {
            LockOutcome::Granted => {
                expected.insert(op.dest.clone(), reply.lock.as_ref().unwrap().fencing_token);
            }
            LockOutcome::Released => {
                expected.remove(&op.dest);
            }
            other => panic!("op {op:?} got {other:?}; a single writer never sees contention"),
        }
    }
    let state = |s: LockStatusReply| -> BTreeMap<String, u64> { s.locks.into_iter().map(|l| (l.destination, l.fencing_token)).collect() };
    let after_restart = state(lock_status(&mut c, "").await?);
    assert_eq!(after_restart, expected, "acknowledged writes survive kill -9 of every coordinator");

    // Re-sending every acknowledged request changes nothing and answers the same.
    for (op, reply) in ops.iter().zip(&acked) {
        let again = send(&mut c, op).await?;
        assert_eq!(again.outcome(), reply.outcome(), "{op:?}");
        assert_eq!(again.lock, reply.lock, "{op:?} applied twice");
    }
    assert_eq!(state(lock_status(&mut c, "").await?), expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn learner_catches_up_through_snapshot_then_membership_changes_while_serving() -> anyhow::Result<()> {
    // 15 KiB entries in batches take longer than FAST_RAFT's 50 ms
    // heartbeat (which openraft also uses as the AppendEntries timeout) on
    // a loaded 2-core machine, and the replication timeouts then cause
    // elections: this test is about snapshots and membership, not speed.
    let raft = ["--heartbeat-ms", "150", "--election-timeout-ms", "1000", "--snapshot-logs", "200"];
    let mut cluster = Cluster::start(3, &raft).await?;

    // At least 10 MB of state: 700 locks with 15 KB reasons, from 8 clients.
    let reason = "x".repeat(15 * 1024);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = cluster.client("operator")?;
        let reason = reason.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..700).step_by(8) {
                let r = acquire(&mut c, &format!("bulk-{i}"), &reason, &format!("bulk-{i}")).await?;
                anyhow::ensure!(r.outcome() == LockOutcome::Granted);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // The leader batches concurrent requests into one log entry, so how
    // many entries the fill made depends on timing. A purge needs two
    // snapshots' worth (200 kept behind the snapshot): one client's writes
    // are one entry each, so write small locks until it happened.
    let mut c = cluster.client("operator")?;
    let mut pads = 0;
    while pads < 1000 && (pads % 50 != 0 || cluster.status().await?.purged_index == 0) {
        acquire(&mut c, &format!("pad-{pads}"), "pad", &format!("pad-{pads}")).await?;
        pads += 1;
    }
    let total_locks = 700 + pads;
    let status = eventually("the leader to purge its log behind a snapshot", Duration::from_secs(30), || async {
        let s = cluster.status().await?;
        Ok((s.purged_index > 0).then_some(s))
    })
    .await?;
    assert!(status.snapshot_index > 0);
    // 700 locks of 15 KiB reasons: over 10 MB.
    assert!(status.snapshot_bytes > 10_000_000, "snapshot of {} bytes", status.snapshot_bytes);

    // Keep a client busy during every membership change; none of its operations may fail.
    let mut busy = cluster.client("operator")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_busy = stop.clone();
    let busy_task = tokio::spawn(async move {
        let mut done = 0u64;
        let mut i = 0u64;
        while !stop_busy.load(std::sync::atomic::Ordering::Relaxed) {
            acquire(&mut busy, "busy", "serving", &format!("busy-a-{i}")).await?;
            release(&mut busy, "busy", &format!("busy-r-{i}")).await?;
            i += 1;
            done += 2;
        }
        anyhow::Ok(done)
    });

    cluster.spawn(4, false, "127.0.0.1:0")?;
    let addr4 = cluster.coords[&4].addr.clone();
    let out = cluster.fleetctl("operator", &["cluster", "add-learner", "4", &addr4, "-o", "json"])?;
    assert!(out.status.success(), "add-learner: {}\n{}", String::from_utf8_lossy(&out.stderr), cluster.log_of(4));

    let learner = eventually("the learner to apply the snapshot", Duration::from_secs(30), || async {
        let s = cluster.local_status(4).await?;
        anyhow::ensure!(
            s.applied_index >= status.purged_index && s.locks >= 700,
            "learner applied {} (leader purged {}), holds {} locks",
            s.applied_index,
            status.purged_index,
            s.locks
        );
        Ok(Some(s))
    })
    .await?;
    assert!(learner.snapshot_index > 0, "the learner was caught up by a snapshot: {learner:?}");
    assert!(learner.snapshot_bytes > 10_000_000, "the learner reports the snapshot it installed: {learner:?}");
    assert!(learner.snapshot_index >= status.purged_index.min(learner.snapshot_index));

    let out = cluster.fleetctl("operator", &["cluster", "promote", "4"])?;
    assert!(out.status.success(), "promote: {}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.fleetctl("operator", &["cluster", "remove", "1"])?;
    assert!(out.status.success(), "remove: {}", String::from_utf8_lossy(&out.stderr));

    let s = eventually("membership {2,3,4} with a leader", Duration::from_secs(30), || async {
        let s = cluster.status().await?;
        let voters: Vec<u64> = s.members.iter().filter(|m| m.kind == "voter").map(|m| m.id).collect();
        Ok((voters == vec![2, 3, 4] && s.leader_id != 0).then_some(s))
    })
    .await?;
    assert!(!s.members.iter().any(|m| m.id == 1));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = busy_task.await??;
    assert!(served > 0, "the busy client made progress");
    // The new member serves the whole state.
    let mut c = cluster.client("operator")?;
    assert_eq!(lock_status(&mut c, "").await?.locks.len(), total_locks as usize);
    // Coordinator 4 applies what the leader committed a moment later: the
    // busy client's last operation may still be on its way.
    eventually("coordinator 4 to hold every lock", Duration::from_secs(10), || async {
        let local4 = cluster.local_status(4).await?;
        anyhow::ensure!(
            local4.locks == total_locks,
            "coordinator 4 holds {} locks of {total_locks} (applied index {})",
            local4.locks,
            local4.applied_index
        );
        Ok(Some(()))
    })
    .await?;
    Ok(())
}

/// A digest of every data file under `dir` (RocksDB's human-readable info
/// log, `LOG*`, is diagnostics, not data, and is left out).
fn dir_digest(dir: &std::path::Path) -> BTreeMap<String, u64> {
    use std::hash::{Hash, Hasher};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if !name.starts_with("LOG") {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&p).unwrap().hash(&mut h);
                out.insert(p.display().to_string(), h.finish());
            }
        }
    }
    out
}

/// Run coordinator 2 in the foreground with the certificates in `certs`.
fn run_coord(
    bin: &std::path::Path,
    listen: &str,
    data: &std::path::Path,
    certs: &std::path::Path,
) -> std::io::Result<std::process::Output> {
    fleetctl::dev::coordinator_command(bin, 2, listen, data, certs).output()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_and_bad_data_dirs_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, FAST_RAFT).await?;
    let certs = cluster.path().join("certs");

    // No client certificate at all: the TLS handshake is refused.
    {
        let ca = std::fs::read(certs.join("ca.pem"))?;
        let tls =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca)).domain_name("127.0.0.1");
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.addrs()[0]))?.tls_config(tls)?.connect_lazy();
        let err = fleet_proto::control_client::ControlClient::new(ch)
            .lock_status(LockStatusRequest::default())
            .await
            .expect_err("a call without a client certificate must fail");
        assert!(
            matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unauthenticated),
            "{err:?}"
        );
    }

    // A certificate from another CA.
    let other = cluster.path().join("other-ca");
    fleetctl::certs::init(&other, false)?;
    std::fs::copy(other.join("operator.pem"), certs.join("stranger.pem"))?;
    std::fs::copy(other.join("operator-key.pem"), certs.join("stranger-key.pem"))?;
    let out = cluster.fleetctl("stranger", &["--retry-for", "2s", "lock", "acquire", "web", "-m", "x"])?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CA"), "the error says what to check: {err}");

    // A viewer may read but not lock.
    let out = cluster.fleetctl("viewer", &["lock", "acquire", "web", "-m", "x"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied") && err.contains("operator"), "{err}");
    let out = cluster.fleetctl("viewer", &["lock", "status"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A node certificate may not make operator calls.
    let out = cluster.fleetctl("node", &["lock", "acquire", "web", "-m", "x"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
    let out = cluster.fleetctl("node", &["cluster", "remove", "2"])?;
    assert!(!out.status.success());

    // Only coordinators may send Raft messages, in a call or on the
    // AppendEntries stream (refused before the payload is read).
    {
        let op = fleet_net::TlsMaterial::load(&certs.join("ca.pem"), &certs.join("operator.pem"), &certs.join("operator-key.pem"), None)?;
        let mut raft = fleet_proto::raft_client::RaftClient::new(op.endpoint(&cluster.addrs()[0], Duration::from_secs(5))?.connect_lazy());
        let payload = RaftPayload { data: b"{}".to_vec(), chunk: Vec::new() };
        let err = raft.append_entries(payload.clone()).await.expect_err("an operator's AppendEntries must be refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        let stream = tokio_stream::iter([payload]);
        let err = raft.append_entries_stream(stream).await.expect_err("an operator's AppendEntries stream must be refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("a coordinator"), "the refusal says who may call: {err:?}");
    }

    // None of the refused calls changed anything.
    let mut c = cluster.client("operator")?;
    assert!(lock_status(&mut c, "").await?.locks.is_empty());
    assert_eq!(cluster.status().await?.members.len(), 3);

    // A corrupted data dir: the coordinator refuses to start and leaves it as it was.
    cluster.kill9(3)?;
    let data3 = cluster.coords[&3].spec.data_dir();
    let manifest = std::fs::read_dir(&data3)?
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("MANIFEST"))
        .expect("a RocksDB manifest");
    std::fs::write(&manifest, b"this is not a manifest")?;
    let before = dir_digest(&data3);
    let err = cluster.restart(3).expect_err("a corrupted data dir must be refused");
    assert!(format!("{err:#}").contains("cannot open the data dir"), "{err:#}");
    assert_eq!(dir_digest(&data3), before, "refusing changed nothing");

    // A data dir of another cluster (other CA) is refused before anything is written.
    let data2 = cluster.coords[&2].spec.data_dir();
    cluster.kill9(2)?;
    let before = dir_digest(&data2);
    let bin = cluster.bin.clone();
    let out = run_coord(&bin, "127.0.0.1:0", &data2, &other)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to cluster"), "{err}");
    assert_eq!(dir_digest(&data2), before);

    // A bad flag names its field and exits 2 without touching the data dir.
    let out = run_coord(&bin, "not-an-address", &data2, &certs)?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`listen`"));
    assert_eq!(dir_digest(&data2), before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_up_starts_a_cluster_and_dev_down_stops_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = fleetctl::dev::find_binary("fleetctl")?;
    let dev_dir = dir.path().join("dev");
    let out = std::process::Command::new(&ctl).args(["dev", "up", "--dir"]).arg(&dev_dir).output()?;
    let guard = scopeguard(&ctl, &dev_dir);
    assert!(out.status.success(), "dev up: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("voter").count(), 3, "{text}");
    assert!(text.contains("export FLEET_CONTEXT="), "{text}");

    let out = std::process::Command::new(&ctl)
        .args(["lock", "acquire", "web", "-m", "quick start", "-o", "json"])
        .env("FLEET_CONTEXT", dev_dir.join("context.json"))
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_of::<LockReplyView>(&out)?.outcome, "granted");
    drop(guard);
    let pids = std::fs::read_to_string(dev_dir.join("pids")).unwrap_or_default();
    assert!(pids.trim().is_empty(), "dev down removed the pid file");
    Ok(())
}

/// Runs `fleetctl dev down` when dropped, so a failed assertion leaves no processes.
struct DevDown(std::path::PathBuf, std::path::PathBuf);
fn scopeguard(ctl: &std::path::Path, dir: &std::path::Path) -> DevDown {
    DevDown(ctl.to_path_buf(), dir.to_path_buf())
}
impl Drop for DevDown {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.0).args(["dev", "down", "--dir"]).arg(&self.1).output();
    }
}
