//! Two clients race for one lock 1,000 times; the history they observe must
//! be linearizable and fencing tokens must only grow.

use std::time::Instant;

use fleet_proto::*;
use fleet_tests::harness::{acquire, release, Cluster, FAST_RAFT};

#[tokio::test(flavor = "multi_thread")]
async fn racing_lock_clients_observe_a_linearizable_history() -> anyhow::Result<()> {
    use fleet_tests::linearizability::{check, check_tokens_grow, Event, LockOp, Outcome};

    let cluster = Cluster::start(3, FAST_RAFT).await?;
    let certs = cluster.path().join("certs");
    for name in ["alice", "bob"] {
        fleetctl::certs::issue(&certs, fleet_core::auth::Role::Operator, name, &[], &certs)?;
    }
    let start = Instant::now();
    let rounds = 1000;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for (client, name) in ["alice", "bob"].into_iter().enumerate() {
        let mut c = cluster.client(name)?;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut events = Vec::new();
            for round in 0..rounds {
                barrier.wait().await;
                let invoked = start.elapsed().as_nanos();
                let r = acquire(&mut c, "race", "race", &format!("{name}-a-{round}")).await;
                let returned = start.elapsed().as_nanos();
                let outcome = match &r {
                    Ok(r) if r.outcome() == LockOutcome::Granted => Outcome::Granted { token: r.lock.as_ref().unwrap().fencing_token },
                    Ok(r) if r.outcome() == LockOutcome::Held => Outcome::Held { by: r.lock.as_ref().unwrap().holder.clone() },
                    Ok(r) => panic!("unexpected acquire outcome {:?}", r.outcome()),
                    Err(_) => Outcome::Unknown,
                };
                let won = matches!(outcome, Outcome::Granted { .. });
                events.push(Event {
                    client,
                    op: LockOp::Acquire { holder: name.into() },
                    outcome,
                    invoked_ns: invoked,
                    returned_ns: returned,
                });
                if won {
                    let invoked = start.elapsed().as_nanos();
                    let r = release(&mut c, "race", &format!("{name}-r-{round}")).await;
                    let returned = start.elapsed().as_nanos();
                    let outcome = match &r {
                        Ok(r) if r.outcome() == LockOutcome::Released => Outcome::Released,
                        Ok(r) if r.outcome() == LockOutcome::NotHeld => Outcome::NotHeld,
                        Ok(r) if r.outcome() == LockOutcome::NotOwner => Outcome::NotOwner { by: r.lock.as_ref().unwrap().holder.clone() },
                        Ok(r) => panic!("unexpected release outcome {:?}", r.outcome()),
                        Err(_) => Outcome::Unknown,
                    };
                    events.push(Event {
                        client,
                        op: LockOp::Release { holder: name.into() },
                        outcome,
                        invoked_ns: invoked,
                        returned_ns: returned,
                    });
                }
            }
            events
        }));
    }
    let mut history = Vec::new();
    for t in tasks {
        history.extend(t.await?);
    }
    let grants = history.iter().filter(|e| matches!(e.outcome, Outcome::Granted { .. })).count();
    let helds = history.iter().filter(|e| matches!(e.outcome, Outcome::Held { .. })).count();
    assert!(grants >= rounds, "every round someone wins: {grants}");
    assert!(helds > 0, "the clients really raced (someone found the lock held)");
    if let Err(v) = check(&history) {
        panic!("history of {} events is not linearizable: {v}", history.len());
    }
    check_tokens_grow(&history).map_err(anyhow::Error::msg)?;
    Ok(())
}
