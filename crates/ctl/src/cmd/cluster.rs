//! `cluster status|add-learner|promote|remove`: coordinator membership.

use std::time::Duration;

use fleet_proto::*;
use fleetctl::exit;
use fleetctl::output::{ClusterStatusView, MembershipView};

use super::common::{client, print_json, Exit};
use crate::cli::{ClusterCmd, ConnArgs, Output};

pub async fn cluster(cmd: ClusterCmd, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    match cmd {
        ClusterCmd::Status { local } => {
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(ClusterStatusRequest { local });
                    req.set_timeout(timeout);
                    async move { cl.cluster_status(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_status(&r, out);
        }
        ClusterCmd::AddLearner { id, address: addr } => {
            // Catching up may mean sending a large snapshot.
            let r = c
                .call_with_timeout(Duration::from_secs(300), |mut cl, timeout| {
                    let mut req = tonic::Request::new(AddLearnerRequest { id, addr: addr.clone() });
                    req.set_timeout(timeout);
                    async move { cl.add_learner(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_members(
                &r,
                out,
                &format!("coordinator {id} added as a learner and caught up; promote it with `fleetctl cluster promote {id}`"),
            );
        }
        ClusterCmd::Promote { id } => {
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(PromoteRequest { id });
                    req.set_timeout(timeout);
                    async move { cl.promote(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_members(&r, out, &format!("coordinator {id} is now a voter"));
        }
        ClusterCmd::Remove { id } => {
            let r = c
                .call(|mut cl, timeout| {
                    let mut req = tonic::Request::new(RemoveMemberRequest { id });
                    req.set_timeout(timeout);
                    async move { cl.remove_member(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_members(&r, out, &format!("coordinator {id} removed; stop its process and delete its data dir"));
        }
    }
    Ok(exit::OK)
}

fn print_members_table(members: &[Member]) {
    println!("{:<4} {:<22} {:<8} {:<9} {:>9} {:>6}", "ID", "ADDR", "KIND", "ROLE", "MATCHED", "LAG");
    for m in members {
        let lag = if m.lag == u64::MAX { "?".to_string() } else { m.lag.to_string() };
        println!("{:<4} {:<22} {:<8} {:<9} {:>9} {:>6}", m.id, m.addr, m.kind, m.role, m.matched_index, lag);
    }
}

fn print_members(r: &MembershipReply, out: Output, msg: &str) {
    match out {
        Output::Json => print_json(&MembershipView::from(r)),
        Output::Text => {
            println!("{msg}");
            print_members_table(&r.members);
        }
    }
}

pub fn print_status(r: &ClusterStatusReply, out: Output) {
    match out {
        Output::Json => print_json(&ClusterStatusView::from(r)),
        Output::Text => {
            let leader =
                if r.leader_id == 0 { "none (election in progress)".to_string() } else { format!("{} at {}", r.leader_id, r.leader_addr) };
            println!("cluster {}   leader {}   term {}", r.cluster_id, leader, r.term);
            println!(
                "log {}   commit {}   applied {}   snapshot {} ({:.1} MiB)   purged {}   (answered by {})",
                r.last_log_index,
                r.commit_index,
                r.applied_index,
                r.snapshot_index,
                r.snapshot_bytes as f64 / (1024.0 * 1024.0),
                r.purged_index,
                r.answered_by
            );
            print_members_table(&r.members);
        }
    }
}
