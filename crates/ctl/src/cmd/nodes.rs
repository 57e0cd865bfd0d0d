//! `nodes`: the worker nodes the leader knows.

use fleet_net::now_ms;
use fleet_proto::*;
use fleetctl::client::Client;
use fleetctl::exit;
use fleetctl::output::NodeRecord;
use fleetctl::progress::{ago, table};

use super::common::{client, print_json, Exit};
use crate::cli::{ConnArgs, Output};

/// The nodes the leader knows, with their liveness.
pub async fn list_nodes(c: &mut Client) -> anyhow::Result<Vec<NodeRecord>> {
    let r = c.unary(ListNodesRequest {}, |mut cl, r| async move { cl.list_nodes(r).await }).await?;
    r.nodes_json
        .iter()
        .map(|j| {
            serde_json::from_str(j).map_err(|e| {
                anyhow::anyhow!("a coordinator sent a node record this fleetctl cannot read ({e}); are both the same version?")
            })
        })
        .collect()
}

/// One row of `fleetctl nodes`.
pub fn node_row(n: &NodeRecord, now: i64) -> Vec<String> {
    let labels = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let connected = match (n.connected, n.lost_ms) {
        (true, _) => "yes",
        (false, Some(_)) => "no (lost: gets no work until it reconnects)",
        (false, None) => "no",
    };
    let seen = n.last_seen_ms.map(|t| ago(now - t)).unwrap_or_else(|| "never (since this leader)".into());
    vec![n.id.clone(), labels, connected.to_string(), seen]
}

pub async fn nodes(conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let list = list_nodes(&mut c).await?;
    match out {
        Output::Json => print_json(&list),
        Output::Text if list.is_empty() => {
            println!("no worker node has registered; start one with `fleet-node --coord ADDR,... --label env=staging ...`")
        }
        Output::Text => {
            let now = now_ms();
            let rows: Vec<Vec<String>> = list.iter().map(|v| node_row(v, now)).collect();
            println!("{}", table(&["ID", "LABELS", "CONNECTED", "LAST SEEN"], &rows));
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_rows() {
        let node = |v: serde_json::Value| -> NodeRecord { serde_json::from_value(v).expect("a node record") };
        let v = node(
            json!({"id": "node-1", "labels": {"env": "dev", "zone": "a"}, "registered_ms": 0, "connected": true, "last_seen_ms": 95_000}),
        );
        assert_eq!(node_row(&v, 100_000), vec!["node-1", "env=dev,zone=a", "yes", "5s ago"]);
        let v = node(json!({"id": "node-2", "labels": {}, "registered_ms": 0, "connected": false, "last_seen_ms": null}));
        assert_eq!(node_row(&v, 100_000), vec!["node-2", "", "no", "never (since this leader)"]);
        let v =
            node(json!({"id": "node-3", "labels": {}, "registered_ms": 0, "lost_ms": 90_000, "connected": false, "last_seen_ms": 80_000}));
        assert_eq!(node_row(&v, 100_000), vec!["node-3", "", "no (lost: gets no work until it reconnects)", "20s ago"]);
    }
}
