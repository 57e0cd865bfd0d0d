//! A node whose Docker Engine is not there, through the real cluster: a
//! deployment to a docker destination fails (exit 3) with an error that
//! names the socket and says what to do, for a socket that does not exist
//! and for one that refuses connections. No engine is needed.
//!
//! Its own test binary: the nodes take their socket from `DOCKER_HOST`,
//! which this test sets for the whole process.

use std::time::Duration;

use anyhow::ensure;
use fleet_tests::harness::{eventually, Fleet};

const DESTINATIONS: &str = "destinations:\n  - name: nosock\n    adapter: docker\n    selector: { role: nosock }\n  \
                            - name: refused\n    adapter: docker\n    selector: { role: refused }\n";

fn manifest(destination: &str) -> String {
    format!(
        "app: web\ndestination: {destination}\nimage: \"fleet-test/web:{{release}}\"\ncontainer_port: 8080\npull: never\n\
         health: {{ image: true, deadline: 10s }}\nretry: {{ max_attempts: 2, backoff: 100ms }}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_refusing_docker_socket_fails_the_deploy_naming_it() {
    let mut f = Fleet::start(&[], DESTINATIONS).await.expect("a cluster");
    let r = no_engine(&mut f).await;
    f.finish(r);
}

async fn no_engine(f: &mut Fleet) -> anyhow::Result<()> {
    let missing = f.cluster.path().join("no-such-docker.sock");
    // A socket file nobody listens on any more: connections are refused.
    let refused = f.cluster.path().join("refused-docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&refused)?);
    for (node, role, socket) in [("node-nosock", "nosock", &missing), ("node-refused", "refused", &refused)] {
        // The node reads DOCKER_HOST when it starts; only this test runs in this binary.
        std::env::set_var("DOCKER_HOST", format!("unix://{}", socket.display()));
        let n = f.cluster.start_node(node, &[("role", role)])?;
        f.nodes.push(n);
    }
    std::env::remove_var("DOCKER_HOST");
    f.cluster.wait_nodes_connected(&["node-nosock", "node-refused"]).await?;

    for (dest, socket, says) in [("nosock", &missing, "does not exist"), ("refused", &refused, "cannot talk to the Docker Engine")] {
        let m = f.cluster.write_file(&format!("{dest}.yaml"), &manifest(dest))?;
        let run = f.cluster.deploy(&m, &["--release", "v1"]).await?;
        run.expect_code(3)?;
        let text = run.text();
        let path = socket.display().to_string();
        ensure!(text.contains(&path) && text.contains(says), "the failure on {dest} names the socket {path} and says `{says}`: {run}");
        ensure!(text.contains("DOCKER_HOST") || text.contains("daemon is running"), "it says what to do: {run}");
    }
    // Nothing is left locked: the destinations take the next deployment.
    eventually("both locks to be free", Duration::from_secs(10), || async {
        let out = f.cluster.ctl(&["lock", "status", "-o", "json"]).await?;
        out.expect_code(0)?;
        Ok((!out.stdout.contains("nosock") && !out.stdout.contains("refused")).then_some(()))
    })
    .await?;
    Ok(())
}
