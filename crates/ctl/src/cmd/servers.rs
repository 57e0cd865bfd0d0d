//! `servers DEST` (a destination's servers as its sync task found them)
//! and `destinations remove NAME`.

use fleet_net::now_ms;
use fleet_proto::*;
use fleetctl::client::{request_id, Client};
use fleetctl::exit;
use fleetctl::output::ServerRecord;
use fleetctl::progress::{ago, table};

use super::common::{client, failed, print_json, Exit};
use crate::cli::{ConnArgs, Output};

/// The servers of `destination`, as the leader lists them.
pub async fn list_servers(c: &mut Client, destination: &str) -> anyhow::Result<Vec<ServerRecord>> {
    let req = ListServersRequest { destination: destination.to_string() };
    let r = c.unary(req, |mut cl, r| async move { cl.list_servers(r).await }).await?;
    r.servers_json
        .iter()
        .map(|j| {
            serde_json::from_str(j).map_err(|e| {
                anyhow::anyhow!("a coordinator sent a server record this fleetctl cannot read ({e}); are both the same version?")
            })
        })
        .collect()
}

/// The rows of `fleetctl servers`: one per server and app (a server that
/// runs nothing of any app has one row).
pub fn server_rows(s: &ServerRecord, now: i64) -> Vec<Vec<String>> {
    let health = match &s.error {
        Some(e) => format!("{} ({e})", s.health.as_str()),
        None => s.health.as_str().to_string(),
    };
    let seen = ago(now - s.last_seen_ms);
    if s.apps.is_empty() {
        return vec![vec![s.id.clone(), "-".into(), "-".into(), health, seen, "no".into()]];
    }
    s.apps
        .iter()
        .map(|(app, a)| {
            let release = format!("{app}@{}", a.release.as_deref().unwrap_or("(none)"));
            let drift = match (a.drift, &a.current) {
                (true, Some(c)) => format!("yes (current {c})"),
                (true, None) => "yes".into(),
                (false, _) => "no".into(),
            };
            vec![s.id.clone(), a.address.clone().unwrap_or_else(|| "-".into()), release, health.clone(), seen.clone(), drift]
        })
        .collect()
}

pub async fn servers(destination: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let list = list_servers(&mut c, &destination).await.map_err(|e| failed(out, e))?;
    match out {
        Output::Json => print_json(&list),
        Output::Text if list.is_empty() => println!(
            "destination `{destination}` has no servers yet: its sync task lists the live nodes its selector matches within a few seconds; `fleetctl nodes` shows the nodes"
        ),
        Output::Text => {
            let now = now_ms();
            let rows: Vec<Vec<String>> = list.iter().flat_map(|s| server_rows(s, now)).collect();
            println!("{}", table(&["SERVER", "ADDRESS", "RELEASE", "HEALTH", "LAST SEEN", "DRIFT"], &rows));
            let pending: Vec<String> = list.iter().filter(|s| !s.catch_up.is_empty()).map(|s| s.id.clone()).collect();
            if !pending.is_empty() {
                println!("\ncatch-up deployment due for {} (`fleetctl history --destination {destination}` shows it once queued)", pending.join(", "));
            }
        }
    }
    Ok(exit::OK)
}

pub async fn remove_destination(name: String, conn: &ConnArgs, out: Output) -> Result<i32, Exit> {
    let mut c = client(conn)?;
    let req = RemoveDestinationRequest { name: name.clone(), request_id: request_id() };
    c.unary(req, |mut cl, r| async move { cl.remove_destination(r).await }).await.map_err(|e| failed(out, e))?;
    match out {
        Output::Json => print_json(&serde_json::json!({ "removed": name })),
        Output::Text => println!("removed destination `{name}` and its servers"),
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleet_core::sync::Health;
    use fleet_core::views::ServerAppView;

    use super::*;

    #[test]
    fn server_rows_show_release_address_health_and_drift() {
        let app = |release: Option<&str>, current: Option<&str>| ServerAppView {
            release: release.map(str::to_string),
            address: Some("127.0.0.1:9000".into()),
            current: current.map(str::to_string),
            drift: release != current,
        };
        let s = ServerRecord {
            destination: "prod".into(),
            id: "node-1".into(),
            health: Health::Unhealthy,
            error: Some("web: container is gone".into()),
            apps: BTreeMap::from([("web".to_string(), app(None, Some("v2"))), ("api".to_string(), app(Some("a1"), Some("a1")))]),
            drift: vec!["web".into()],
            first_seen_ms: 0,
            last_seen_ms: 10_000,
            catch_up: vec![],
        };
        let rows = server_rows(&s, 15_000);
        assert_eq!(rows[0], ["node-1", "127.0.0.1:9000", "api@a1", "unhealthy (web: container is gone)", "5s ago", "no"]);
        assert_eq!(rows[1], ["node-1", "127.0.0.1:9000", "web@(none)", "unhealthy (web: container is gone)", "5s ago", "yes (current v2)"]);
        let empty = ServerRecord { apps: BTreeMap::new(), health: Health::Healthy, error: None, ..s };
        assert_eq!(server_rows(&empty, 15_000), [["node-1", "-", "-", "healthy", "5s ago", "no"]]);
    }
}
