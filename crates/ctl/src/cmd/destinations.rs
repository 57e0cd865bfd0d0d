//! `destinations` (list) and `destinations apply -f FILE`.

use fleet_core::manifest::parse_destinations;
use fleet_proto::*;
use fleetctl::client::{request_id, Client};
use fleetctl::exit;
use fleetctl::progress::table;
use serde_json::Value;

use super::common::{client, failed, invalid, print_json_array, read_file, Exit};
use crate::cli::{ConnArgs, DestinationsCmd, Output};

fn str_of(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One row of `fleetctl destinations` from a destination record (the
/// destination plus `lock_holder`, `queue` (ids), `current`, `nodes`).
pub fn destination_row(v: &Value) -> Vec<String> {
    let selector = match v["selector"].as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","),
        _ => "(every node)".into(),
    };
    // The policy is `queue` in the destinations file; the server's record
    // may use that key for the queued ids instead.
    let policy = [&v["queue_policy"], &v["policy"], &v["queue"]].into_iter().find_map(|p| p.as_str()).unwrap_or("-").to_string();
    let queued: Vec<String> = [&v["queue"], &v["queued"]]
        .into_iter()
        .find_map(|q| q.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let lock = match v["lock_holder"].as_str() {
        Some(h) => h.strip_prefix(fleet_core::state::DEPLOYMENT_HOLDER_PREFIX).unwrap_or(h).to_string(),
        None => "free".into(),
    };
    let queued = match queued.len() {
        0 => "0".to_string(),
        n if n <= 3 => format!("{n} ({})", queued.join(",")),
        n => format!("{n} ({},…)", queued[..3].join(",")),
    };
    let current = v["current"]
        .as_object()
        .map(|m| m.iter().map(|(app, r)| format!("{app}@{}", r.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    let nodes = v["nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into());
    // How long work waits for a lost node; older coordinators do not say.
    let node_wait = v["node_wait"].as_str().unwrap_or("-").to_string();
    vec![str_of(v, "name"), str_of(v, "adapter"), selector, policy, node_wait, lock, queued, current, nodes]
}

fn print_destinations(items: &[String], out: Output) -> Result<(), Exit> {
    if out == Output::Json {
        return print_json_array(items);
    }
    let values: Vec<Value> = items.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
    if values.is_empty() {
        println!("no destinations yet; `fleetctl destinations apply -f FILE` creates them (see `fleetctl destinations apply --help`)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = values.iter().map(destination_row).collect();
    println!("{}", table(&["NAME", "ADAPTER", "SELECTOR", "POLICY", "NODE WAIT", "LOCK", "QUEUED", "CURRENT", "NODES"], &rows));
    if rows.iter().any(|r| r[8] == "none") {
        println!("\nA destination with no nodes cannot take deployments: start `fleet-node` with labels that match its selector");
    }
    Ok(())
}

pub async fn destinations(cmd: Option<DestinationsCmd>, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    match cmd.unwrap_or(DestinationsCmd::List) {
        DestinationsCmd::List => {
            let mut c = client(conn)?;
            let r = c.unary(ListDestinationsRequest {}, |mut cl, r| async move { cl.list_destinations(r).await }).await?;
            print_destinations(&r.destinations_json, out)?;
        }
        DestinationsCmd::Apply { file } => {
            let name = file.display().to_string();
            let hint = "`fleetctl destinations apply --help` shows an example";
            let text = match read_file(out, &file, "destinations file", hint) {
                Ok(t) => t,
                Err(code) => return Ok(code),
            };
            let parsed = match parse_destinations(&name, &text) {
                Ok(p) => p,
                Err(e) => return Ok(invalid(out, &e, &format!("fix `{}` in {name} and run again; {hint}", e.field))),
            };
            let mut c = client(conn)?;
            let r = apply_destinations(&mut c, &name, &text).await.map_err(|e| failed(out, e))?;
            if out == Output::Text {
                println!("applied {} destination(s) from {name}", parsed.len());
            }
            print_destinations(&r.destinations_json, out)?;
        }
        DestinationsCmd::Remove { name } => return super::servers::remove_destination(name, conn, out).await,
    }
    Ok(exit::OK)
}

pub async fn apply_destinations(c: &mut Client, file_name: &str, text: &str) -> anyhow::Result<DestinationsReply> {
    let req = ApplyDestinationsRequest { destinations_yaml: text.to_string(), file_name: file_name.to_string(), request_id: request_id() };
    c.unary(req, |mut cl, r| async move { cl.apply_destinations(r).await }).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn destination_rows() {
        // (record as the server sends it, expected row)
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (
                json!({"name": "dev", "adapter": "process", "selector": {"env": "dev"}, "queue": ["d3", "d4"], "node_wait": "30s",
                       "lock_holder": "deployment/d3", "lock_token": 9, "current": {"web": "v1"}, "nodes": ["node-1", "node-2"]}),
                vec!["dev", "process", "env=dev", "-", "30s", "d3", "2 (d3,d4)", "web@v1", "node-1,node-2"],
            ),
            (
                json!({"name": "prod", "adapter": "process", "selector": {}, "queue": "reject", "queued": [],
                       "lock_holder": null, "current": {}, "nodes": []}),
                vec!["prod", "process", "(every node)", "reject", "-", "free", "0", "-", "none"],
            ),
            (
                json!({"name": "x", "adapter": "process", "queue_policy": "coalesce", "queue": ["d1", "d2", "d3", "d4"],
                       "lock_holder": "alice"}),
                vec!["x", "process", "(every node)", "coalesce", "-", "alice", "4 (d1,d2,d3,…)", "-", "none"],
            ),
        ];
        for (v, want) in cases {
            assert_eq!(destination_row(&v), want, "{v}");
        }
    }
}
