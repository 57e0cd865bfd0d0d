//! The `docker` adapter against this machine's Docker Engine: the blue-green
//! steps, their exact undos in the order the leader runs them, `forget`, a
//! restarted adapter adopting its route, and the error for a missing socket. Images are built `FROM scratch` by
//! `fleet_docker::testimage` (no registry).

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_core::deploy::ErrorClass;
use fleet_core::manifest::{ContainerManifest, HealthCheck, LimitsSpec, Probe, PullPolicy};
use fleet_core::saga::StepAction;
use fleet_docker::testimage::{build_web_image, WebImage, WEB_PORT};
use fleet_docker::{Engine, LabelFilter};
use fleet_node::adapter::{Adapter, StepContext};
use fleet_node::docker::{DockerAdapter, DockerConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ctx(destination: &str, deployment: &str, step: u32, token: u64, undo: bool) -> StepContext {
    StepContext {
        node: "node-1".into(),
        destination: destination.into(),
        deployment: deployment.into(),
        step,
        attempt: 1,
        undo,
        token,
        timeout: Duration::from_secs(60),
    }
}

fn start(release: &str, image: &str) -> StepAction {
    StepAction::StartContainer {
        app: "web".into(),
        release: release.into(),
        container: Box::new(ContainerManifest {
            image: image.into(),
            command: None,
            container_port: WEB_PORT,
            volumes: vec![],
            limits: LimitsSpec::default(),
            pull: PullPolicy::Never,
        }),
        env: BTreeMap::new(),
    }
}

fn health(release: &str) -> StepAction {
    let check = HealthCheck {
        probe: Probe::Http { path: "/healthz".into() },
        interval_ms: 100,
        timeout_ms: 1000,
        healthy_threshold: 2,
        deadline_ms: 15_000,
    };
    StepAction::HealthCheck { app: "web".into(), release: release.into(), check }
}

fn switch(release: &str) -> StepAction {
    StepAction::SwitchRoute { app: "web".into(), release: release.into(), port: 0, listen: None }
}

fn stop_old(release: &str) -> StepAction {
    StepAction::StopOld { app: "web".into(), release: release.into(), drain_ms: 500 }
}

async fn get(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the route");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    buf.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or(buf)
}

async fn names(engine: &Engine, destination: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = engine
        .list(&LabelFilter::managed().destination(destination))
        .await
        .expect("list")
        .into_iter()
        .map(|c| (c.fleet.map(|f| f.release).unwrap_or_default(), format!("{:?}", c.state)))
        .collect();
    v.sort();
    v
}

async fn cleanup(engine: &Engine, destination: &str) {
    for c in engine.list(&LabelFilter::managed().destination(destination)).await.unwrap_or_default() {
        let _ = engine.stop_and_remove(&c.id, Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blue_green_steps_and_their_exact_undos() {
    let engine = Engine::connect().await.expect("this test needs the Docker Engine");
    for r in ["v1", "v2"] {
        build_web_image(&engine, &WebImage::new(format!("fleet-test/web-node:{r}"), r)).await.expect("build");
    }
    let dest = format!("nodeundo-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let a = DockerAdapter::open(DockerConfig::new(dir.path())).expect("open");
    let image = "fleet-test/web-node:{release}";
    // Removes the test's containers even when an assertion below panics.
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let dest = self.0.clone();
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                rt.block_on(async {
                    if let Ok(engine) = Engine::connect().await {
                        cleanup(&engine, &dest).await;
                    }
                });
            })
            .join();
        }
    }
    let _cleanup = Cleanup(dest.clone());
    let result = async {
        // d1 (token 1): v1 all the way.
        let c1 = |step, undo| ctx(&dest, "d1", step, 1, undo);
        a.run(&c1(0, false), &start("v1", image)).await?;
        a.run(&c1(1, false), &health("v1")).await?;
        let sw1 = a.run(&c1(2, false), &switch("v1")).await?;
        a.run(&c1(3, false), &stop_old("v1")).await?;
        let (route, _) = a.route(&dest, "web").expect("a route");
        assert_eq!(get(route).await, "release=v1");

        // d2 (token 2): v2 through stop-old.
        let c2 = |step, undo| ctx(&dest, "d2", step, 2, undo);
        let st2 = a.run(&c2(0, false), &start("v2", image)).await?;
        // A retried start adopts its own container.
        let again = a.run(&c2(0, false), &start("v2", image)).await?;
        assert_eq!(again["container"], st2["container"]);
        assert_eq!(again["adopted"], Value::Bool(true));
        a.run(&c2(1, false), &health("v2")).await?;
        let sw2 = a.run(&c2(2, false), &switch("v2")).await?;
        assert_eq!(sw2["route"], sw1["route"], "the route keeps its port");
        let stopped = a.run(&c2(3, false), &stop_old("v2")).await?;
        assert_eq!(get(route).await, "release=v2");
        assert_eq!(names(&engine, &dest).await, [("v2".to_string(), "Running".to_string())]);
        let listed = engine.list(&LabelFilter::managed().destination(&dest).node("node-1")).await.expect("list");
        assert_eq!(listed.len(), 1, "the container carries its node's label");

        // Undo start while v2 serves: refused.
        let refused = a.undo(&c2(0, true), &start("v2", image), Some(&st2)).await.unwrap_err();
        assert_eq!(refused.class, ErrorClass::Invalid);

        // Undo in reverse order: v1 is re-created, the route points back, v2 is removed.
        a.undo(&c2(3, true), &stop_old("v2"), Some(&stopped)).await?;
        assert_eq!(names(&engine, &dest).await.len(), 2);
        a.undo(&c2(2, true), &switch("v2"), Some(&sw2)).await?;
        assert_eq!(get(route).await, "release=v1");
        a.undo(&c2(1, true), &health("v2"), None).await?;
        a.undo(&c2(0, true), &start("v2", image), Some(&st2)).await?;
        assert_eq!(names(&engine, &dest).await, [("v1".to_string(), "Running".to_string())]);
        // Undoing again finds everything already undone.
        a.undo(&c2(0, true), &start("v2", image), Some(&st2)).await?;
        a.undo(&c2(2, true), &switch("v2"), Some(&sw2)).await?;

        // forget: a staged container of token 3 goes, the active one (token 1) stays.
        a.run(&ctx(&dest, "d3", 0, 3, false), &start("v2", image)).await?;
        let removed = a.forget(&dest, 3).await;
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(a.forget(&dest, 1).await.is_empty(), "the active container is never forgotten");
        assert_eq!(names(&engine, &dest).await, [("v1".to_string(), "Running".to_string())]);
        assert_eq!(get(route).await, "release=v1");

        // A restarted node (a new adapter on the same data dir) listens on
        // the same route again, pointed at the container that kept running.
        a.shutdown().await;
        let b = DockerAdapter::open(DockerConfig::new(dir.path())).expect("reopen");
        assert_eq!(b.route(&dest, "web").map(|r| r.0), Some(route));
        assert_eq!(get(route).await, "release=v1");
        let rec = b.record(&dest, "web").expect("a record");
        assert_eq!((rec.active.map(|c| c.release), rec.staged, rec.retired), (Some("v1".to_string()), None, None));
        b.shutdown().await;
        Ok::<(), fleet_node::adapter::StepError>(())
    }
    .await;
    a.shutdown().await;
    result.expect("the steps");
}

#[tokio::test]
async fn a_missing_socket_fails_the_step_naming_it_as_transient() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-such-docker.sock");
    let a = DockerAdapter::new(DockerConfig { socket: Some(socket.clone()), ..DockerConfig::new(dir.path()) });
    let err = a.run(&ctx("d", "d1", 0, 1, false), &start("v1", "web:{release}")).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient);
    assert!(err.message.contains(&socket.display().to_string()), "{}", err.message);
    assert!(err.message.contains("DOCKER_HOST"), "says what to do: {}", err.message);
    // forget without an engine removes nothing and does not fail.
    assert!(a.forget("d", 1).await.is_empty());
}
