//! fleet-node against the real `fleet-demo-app`: the process adapter's
//! blue-green steps and their undos, supervision, adoption after a restart,
//! and the agent's rules (idempotency, fencing, timeouts, aborts, witness).
//!
//! Waits poll a condition until a deadline; nothing sleeps a fixed time.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fleet_core::deploy::ErrorClass;
use fleet_core::manifest::{HealthCheck, Probe};
use fleet_core::saga::StepAction;
use fleet_node::adapter::{Adapter, Adapters, StepContext, StepError};
use fleet_node::agent::Agent;
use fleet_node::command::{CommandAdapter, CommandConfig};
use fleet_node::fencing::Fencing;
use fleet_node::process::{ProcessAdapter, ProcessConfig};
use fleet_node::witness::Witness;
use fleet_proto::{Abort, ErrorClass as WireClass, StepAssignment, StepKey, StepResult};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ------------------------------------------------------------------ helpers

/// The directory holding a freshly built `fleet-demo-app`: `cargo build -p
/// fleet-demo-app` into the target dir this test binary was built in (a
/// no-op when it is up to date). `FLEET_DEMO_APP=/path/to/binary` skips
/// the build.
fn demo_app_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(p) = std::env::var_os("FLEET_DEMO_APP") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "FLEET_DEMO_APP={} is not a file", p.display());
            return p.parent().expect("binary has a directory").to_path_buf();
        }
        let exe = std::env::current_exe().expect("test executable path");
        // <target>/<profile>/deps/node-HASH
        let profile_dir = exe.parent().and_then(Path::parent).expect("test binary lives in <target>/<profile>/deps").to_path_buf();
        let target_dir = profile_dir.parent().expect("profile dir has a parent");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(p) => p.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "fleet-demo-app", "--profile", &profile, "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo to build fleet-demo-app");
        assert!(status.success(), "building fleet-demo-app failed");
        assert!(profile_dir.join("fleet-demo-app").is_file(), "no fleet-demo-app in {}", profile_dir.display());
        profile_dir
    })
    .clone()
}

/// Kills every instance of the adapter if a test fails half-way.
struct Cleanup(ProcessAdapter);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (_, i) in self.0.instances() {
            if i.pid > 1 {
                unsafe { libc::kill(-(i.pid as i32), libc::SIGKILL) };
            }
        }
    }
}

fn config(dir: &Path) -> ProcessConfig {
    let mut cfg = ProcessConfig::new(dir);
    cfg.path_prepend = vec![demo_app_dir()];
    cfg
}

async fn adapter(dir: &Path) -> (ProcessAdapter, Cleanup) {
    adapter_with(config(dir)).await
}

async fn adapter_with(cfg: ProcessConfig) -> (ProcessAdapter, Cleanup) {
    let a = ProcessAdapter::open(cfg).await.expect("open the process adapter");
    (a.clone(), Cleanup(a))
}

fn command_adapter(dir: &Path) -> CommandAdapter {
    let mut cfg = CommandConfig::new(dir);
    cfg.path_prepend = vec![demo_app_dir()];
    CommandAdapter::new(cfg)
}

/// What fleet-node runs with: the process adapter and the command adapter
/// on the same data dir.
fn adapters(process: ProcessAdapter, dir: &Path) -> Adapters {
    let process: Arc<dyn Adapter> = Arc::new(process);
    let command: Arc<dyn Adapter> = Arc::new(command_adapter(dir));
    Adapters::new([process, command])
}

fn ctx(token: u64, step: u32, undo: bool) -> StepContext {
    ctx_in("staging", token, step, undo)
}

fn ctx_in(destination: &str, token: u64, step: u32, undo: bool) -> StepContext {
    StepContext {
        node: "node-1".into(),
        destination: destination.into(),
        deployment: format!("dep-{token}"),
        step,
        attempt: 1,
        undo,
        token,
        timeout: Duration::from_secs(60),
    }
}

fn start(release: &str, env: &[(&str, &str)]) -> StepAction {
    StepAction::StartInstance {
        app: "web".into(),
        release: release.into(),
        run: vec!["fleet-demo-app".into(), "--release".into(), "{release}".into()],
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

fn health(release: &str, deadline_ms: u64) -> StepAction {
    StepAction::HealthCheck {
        app: "web".into(),
        release: release.into(),
        check: HealthCheck {
            probe: Probe::Http { path: "/healthz".into() },
            interval_ms: 50,
            timeout_ms: 1000,
            healthy_threshold: 2,
            deadline_ms,
        },
    }
}

fn switch(release: &str) -> StepAction {
    StepAction::SwitchRoute { app: "web".into(), release: release.into(), port: 0, listen: None }
}

fn stop_old(release: &str) -> StepAction {
    StepAction::StopOld { app: "web".into(), release: release.into(), drain_ms: 3000 }
}

/// Outputs of start, health, switch, stop-old.
struct Deployed {
    start: Value,
    switch: Value,
    stop_old: Value,
}

async fn deploy(a: &ProcessAdapter, token: u64, release: &str) -> Deployed {
    deploy_in(a, "staging", token, release).await
}

/// The four blue-green steps of `release` of `web` for `destination`.
async fn deploy_in(a: &ProcessAdapter, destination: &str, token: u64, release: &str) -> Deployed {
    let run = |step: u32, action: StepAction| {
        let a = a.clone();
        let ctx = ctx_in(destination, token, step, false);
        async move { a.run(&ctx, &action).await.unwrap_or_else(|e| panic!("{} of {release} in {destination}: {e}", action.verb())) }
    };
    let start = run(0, start(release, &[])).await;
    run(1, health(release, 10_000)).await;
    let switch = run(2, switch(release)).await;
    let stop_old = run(3, stop_old(release)).await;
    Deployed { start, switch, stop_old }
}

/// One GET with `Connection: close`: (status, body).
async fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The release the route on `port` answers with.
async fn release_at(port: u16) -> Option<String> {
    let (status, body) = get(port, "/release").await.ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    v["release"].as_str().map(str::to_string)
}

/// Poll `cond` every 20 ms until it holds; panic with `what` at the deadline.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

async fn port_refuses(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.is_err()
}

fn route_port(a: &ProcessAdapter) -> u16 {
    a.route("staging", "web").expect("web has a route").0
}

fn pid_of(v: &Value) -> u32 {
    v["pid"].as_u64().expect("output has a pid") as u32
}

// --------------------------------------------------------- process adapter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_deploy_drops_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;

    let v1 = deploy(&a, 1, "v1").await;
    assert_eq!(v1.stop_old["stopped"], Value::Null, "first deploy has nothing to stop");
    assert_eq!(v1.switch["previous"], Value::Null);
    let port = route_port(&a);
    assert_eq!(v1.switch["route"], format!("127.0.0.1:{port}"));
    assert_eq!(release_at(port).await.as_deref(), Some("v1"));

    // Hammer the route with new connections while v2 replaces v1.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, ok, failures, seen) = (stop.clone(), ok.clone(), failures.clone(), seen.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match get(port, "/").await {
                    Ok((200, body)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        let r = body.trim().rsplit(' ').next().unwrap_or("").to_string();
                        *seen.lock().unwrap().entry(r).or_default() += 1;
                    }
                    Ok((status, body)) => failures.lock().unwrap().push(format!("{status}: {body}")),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    eventually("clients got answers from v1", Duration::from_secs(10), || async { ok.load(Ordering::SeqCst) >= 20 }).await;

    let v2 = deploy(&a, 2, "v2").await;
    let before = ok.load(Ordering::SeqCst);
    eventually("clients got answers from v2", Duration::from_secs(10), || async {
        ok.load(Ordering::SeqCst) >= before + 20 && seen.lock().unwrap().get("v2").copied().unwrap_or(0) >= 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    eprintln!("requests answered: {:?}, failed: {}", seen.lock().unwrap(), failures.len());
    assert!(failures.is_empty(), "{} failed requests during the deploy, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.get("v1").copied().unwrap_or(0) > 0 && seen.get("v2").copied().unwrap_or(0) > 0, "{seen:?}");
    assert_eq!(seen.len(), 2, "only v1 and v2 answered: {seen:?}");

    // The route kept its port; v1 is gone; v2 is active.
    assert_eq!(route_port(&a), port);
    assert_eq!(v2.switch["previous"]["release"], "v1");
    assert_eq!(v2.stop_old["stopped"]["release"], "v1");
    let v1_pid = pid_of(&v1.start);
    eventually("v1 exited", Duration::from_secs(5), || async { !alive(v1_pid) }).await;
    assert!(port_refuses(v1.start["port"].as_u64().unwrap() as u16).await);
    let rec = a.record("staging", "web").unwrap();
    assert_eq!(rec.active.as_ref().map(|i| i.release.as_str()), Some("v2"));
    assert!(rec.staged.is_none() && rec.retired.is_none());
    // The state file says the same.
    let on_disk: Value = serde_json::from_slice(&std::fs::read(dir.path().join("apps/staging+web.json")).unwrap()).unwrap();
    assert_eq!(on_disk["active"]["release"], "v2");
    assert_eq!(on_disk["route_port"], port);
    // The fencing token of the deployment that started it is kept with it.
    assert_eq!(on_disk["active"]["token"], 2);

    a.stop_all().await;
    let v2_pid = pid_of(&v2.start);
    eventually("v2 exited", Duration::from_secs(5), || async { !alive(v2_pid) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_health_check_and_its_undo_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    deploy(&a, 1, "v1").await;
    let route = route_port(&a);

    let out = a.run(&ctx(2, 0, false), &start("v2", &[("DEMO_FAIL_HEALTH", "1")])).await.unwrap();
    let (pid, port) = (pid_of(&out), out["port"].as_u64().unwrap() as u16);
    assert!(alive(pid));

    let err = a.run(&ctx(2, 1, false), &health("v2", 1000)).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Invalid, "{err}");
    for words in ["web@v2 did not pass its health check", "GET /healthz answered 503", "within 1s", "web-v2-"] {
        assert!(err.message.contains(words), "`{}` should contain `{words}`", err.message);
    }
    // The route never moved.
    assert_eq!(release_at(route).await.as_deref(), Some("v1"));

    // Compensation: undo of start (health has no undo).
    assert_eq!(a.undo(&ctx(2, 1, true), &health("v2", 1000), None).await.unwrap(), serde_json::json!({}));
    let undone = a.undo(&ctx(2, 0, true), &start("v2", &[]), Some(&out)).await.unwrap();
    assert_eq!(undone["stopped"]["release"], "v2");
    eventually("v2 exited", Duration::from_secs(5), || async { !alive(pid) }).await;
    assert!(port_refuses(port).await, "v2's port {port} still answers");
    let rec = a.record("staging", "web").unwrap();
    assert!(rec.staged.is_none());
    assert_eq!(rec.active.as_ref().map(|i| i.release.as_str()), Some("v1"));
    assert!(!a.instances().iter().any(|(_, i)| i.release == "v2"));
    assert_eq!(release_at(route).await.as_deref(), Some("v1"));

    // Undo is idempotent.
    let again = a.undo(&ctx(2, 0, true), &start("v2", &[]), Some(&out)).await.unwrap();
    assert_eq!(again["stopped"], Value::Null);
    a.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_exits_at_once_fails_its_start_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let action = StepAction::StartInstance {
        app: "web".into(),
        release: "bad".into(),
        run: vec!["sh".into(), "-c".into(), "echo cannot open config.toml >&2; exit 3".into()],
        env: BTreeMap::new(),
    };
    let err = a.run(&ctx(1, 0, false), &action).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Invalid);
    for words in ["web@bad exited with status 3", "cannot open config.toml"] {
        assert!(err.message.contains(words), "`{}` should contain `{words}`", err.message);
    }
    assert!(a.record("staging", "web").unwrap().staged.is_none());

    let missing = StepAction::StartInstance {
        app: "web".into(),
        release: "bad".into(),
        run: vec!["no-such-server-fleet".into()],
        env: BTreeMap::new(),
    };
    let err = a.run(&ctx(1, 0, false), &missing).await.unwrap_err();
    assert!(err.message.contains("`no-such-server-fleet` was not found"), "{err}");
}

/// Another process takes the port an instance got before the instance
/// listens on it (the race of 100 destinations starting at once): the start
/// is tried again on another port instead of failing the deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_port_another_process_took_is_started_on_another_port() {
    let dir = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // The first instance exits once the test holds its port; this only has
    // to cover the test's poll, not a fixed wait (a start that does not
    // exit returns after it).
    cfg.exit_grace = Duration::from_secs(3);
    let (a, _cleanup) = adapter_with(cfg).await;
    let m = marks.path().display();
    // The first run says its port and exits once the test listens on it;
    // the second is the real app.
    let script = format!(
        "if [ -e {m}/first ]; then exec fleet-demo-app --release v1; fi; touch {m}/first; echo $PORT > {m}/port.tmp; mv {m}/port.tmp {m}/port; \
         while [ ! -e {m}/held ]; do sleep 0.01; done; echo 'listen: Address already in use' >&2; exit 1"
    );
    let action = StepAction::StartInstance {
        app: "web".into(),
        release: "v1".into(),
        run: vec!["sh".into(), "-c".into(), script],
        env: BTreeMap::new(),
    };
    let started = tokio::spawn({
        let a = a.clone();
        async move { a.run(&ctx(1, 0, false), &action).await }
    });
    let port_file = marks.path().join("port");
    eventually("the first instance says its port", Duration::from_secs(10), || {
        let exists = port_file.exists();
        async move { exists }
    })
    .await;
    let taken: u16 = std::fs::read_to_string(&port_file).unwrap().trim().parse().expect("a port");
    let _intruder = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, taken)).expect("the test takes the instance's port");
    std::fs::write(marks.path().join("held"), b"").unwrap();

    let out = started.await.expect("the start task").expect("the start succeeds on another port");
    let port = out["port"].as_u64().expect("a port") as u16;
    assert_ne!(port, taken);
    assert_eq!(a.record("staging", "web").unwrap().staged.map(|i| i.port), Some(port));
    eventually("the second instance serves v1", Duration::from_secs(10), || async move { release_at(port).await.as_deref() == Some("v1") })
        .await;
    a.stop_all().await;
}

/// Another node on the machine can hold the port for a moment only (while
/// it checks that the port binds): gone again when the instance's exit is
/// seen. What the instance said in its log is enough to start it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_lost_its_port_for_a_moment_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let m = marks.path().display();
    // The first run says its port was in use (nobody holds it any more)
    // and exits; the second is the real app.
    let script = format!(
        "if [ -e {m}/first ]; then exec fleet-demo-app --release v1; fi; echo $PORT > {m}/first; \
         echo \"cannot listen on 127.0.0.1:$PORT: Address already in use (os error 98)\" >&2; exit 1"
    );
    let action = StepAction::StartInstance {
        app: "web".into(),
        release: "v1".into(),
        run: vec!["sh".into(), "-c".into(), script],
        env: BTreeMap::new(),
    };
    let out = a.run(&ctx(1, 0, false), &action).await.expect("the start succeeds on another port");
    let first: u16 = std::fs::read_to_string(marks.path().join("first")).unwrap().trim().parse().expect("a port");
    let port = out["port"].as_u64().expect("a port") as u16;
    assert_ne!(port, first, "started again on another port");
    eventually("the second instance serves v1", Duration::from_secs(10), || async move { release_at(port).await.as_deref() == Some("v1") })
        .await;
    a.stop_all().await;
}

/// Undoing stop-old starts the old release again on its old port. If
/// another process took that port meanwhile, the port answers at once (the
/// other process) while the instance started again exits, unable to
/// bind: the undo must fail and say so, not report the old release back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_of_stop_old_fails_when_another_process_took_the_old_port() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let v1 = deploy(&a, 1, "v1").await;
    let v1_port = v1.start["port"].as_u64().unwrap() as u16;
    let v2 = deploy(&a, 2, "v2").await;
    let v1_pid = pid_of(&v1.start);
    eventually("v1 exited", Duration::from_secs(5), || async { !alive(v1_pid) }).await;

    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, v1_port)).expect("v1's old port is free again");
    let e = a.undo(&ctx(2, 3, true), &stop_old("v2"), Some(&v2.stop_old)).await.expect_err("v1 cannot come back on a taken port");
    assert_eq!(e.class, ErrorClass::Invalid, "{e:?}");
    assert!(e.message.contains(&format!("another process holds port {v1_port}")), "{}", e.message);
    assert_eq!(a.record("staging", "web").unwrap().retired, None, "the instance that could not bind is not recorded");
    // v2 still serves: nothing was switched.
    assert_eq!(release_at(route_port(&a)).await.as_deref(), Some("v2"));
    drop(squatter);
    a.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_of_switch_and_stop_old_restore_the_previous_release() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let v1 = deploy(&a, 1, "v1").await;
    let route = route_port(&a);
    let v1_port = v1.start["port"].as_u64().unwrap() as u16;

    // v2 all the way, then compensate in reverse order.
    let v2 = deploy(&a, 2, "v2").await;
    assert_eq!(release_at(route).await.as_deref(), Some("v2"));
    let v1_pid = pid_of(&v1.start);
    eventually("v1 exited", Duration::from_secs(5), || async { !alive(v1_pid) }).await;

    let restarted = a.undo(&ctx(2, 3, true), &stop_old("v2"), Some(&v2.stop_old)).await.unwrap();
    assert_eq!(restarted["restarted"]["release"], "v1");
    assert_eq!(restarted["restarted"]["port"], v1_port, "v1 comes back on its old port");
    assert_eq!(a.record("staging", "web").unwrap().retired.map(|r| r.release), Some("v1".into()));
    // The route still serves v2 until the switch is undone.
    assert_eq!(release_at(route).await.as_deref(), Some("v2"));

    let back = a.undo(&ctx(2, 2, true), &switch("v2"), Some(&v2.switch)).await.unwrap();
    assert_eq!(back["active"]["release"], "v1");
    assert_eq!(release_at(route).await.as_deref(), Some("v1"));
    assert_eq!(route_port(&a), route, "the route keeps its port");
    let rec = a.record("staging", "web").unwrap();
    assert_eq!(rec.active.as_ref().map(|i| i.release.as_str()), Some("v1"));
    assert_eq!(rec.staged.as_ref().map(|i| i.release.as_str()), Some("v2"));
    assert!(rec.retired.is_none());

    // Undoing the switch again changes nothing.
    a.undo(&ctx(2, 2, true), &switch("v2"), Some(&v2.switch)).await.unwrap();
    assert_eq!(release_at(route).await.as_deref(), Some("v1"));

    a.undo(&ctx(2, 0, true), &start("v2", &[]), Some(&v2.start)).await.unwrap();
    let v2_pid = pid_of(&v2.start);
    eventually("v2 exited", Duration::from_secs(5), || async { !alive(v2_pid) }).await;
    assert_eq!(release_at(route).await.as_deref(), Some("v1"));

    // Undo of a first deploy's switch closes the route.
    let dir2 = tempfile::tempdir().unwrap();
    let (b, _cleanup2) = adapter(dir2.path()).await;
    let first = deploy(&b, 1, "v1").await;
    let p = route_port(&b);
    b.undo(&ctx(1, 2, true), &switch("v1"), Some(&first.switch)).await.unwrap();
    assert!(b.route("staging", "web").is_none());
    assert!(port_refuses(p).await);
    b.undo(&ctx(1, 0, true), &start("v1", &[]), Some(&first.start)).await.unwrap();
    assert!(b.instances().is_empty());
    a.stop_all().await;
    b.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_destinations_deploy_the_same_app_independently() {
    let dir = tempfile::tempdir().unwrap();
    let (a, cleanup) = adapter(dir.path()).await;
    let route_of = |a: &ProcessAdapter, dest: &str| a.route(dest, "web").unwrap_or_else(|| panic!("web of {dest} has a route")).0;

    deploy_in(&a, "staging", 1, "v1").await;
    let p1 = deploy_in(&a, "prod", 2, "p1").await;
    assert_eq!(p1.switch["previous"], Value::Null, "prod's first deploy does not see staging's instance");
    assert_eq!(p1.stop_old["stopped"], Value::Null, "prod's first deploy stops nothing of staging's");
    let (staging, prod) = (route_of(&a, "staging"), route_of(&a, "prod"));
    assert_ne!(staging, prod, "each destination has its own route");
    assert_eq!(release_at(staging).await.as_deref(), Some("v1"));
    assert_eq!(release_at(prod).await.as_deref(), Some("p1"));
    assert!(dir.path().join("apps/staging+web.json").is_file() && dir.path().join("apps/prod+web.json").is_file());
    assert_eq!(a.instances().len(), 2);

    // staging moves on to v2 and back: prod keeps serving p1 from the same process.
    let s2 = deploy_in(&a, "staging", 3, "v2").await;
    assert_eq!(s2.stop_old["stopped"]["release"], "v1", "staging's deploy retires staging's v1, not prod's p1");
    assert_eq!(release_at(staging).await.as_deref(), Some("v2"));
    assert_eq!(release_at(prod).await.as_deref(), Some("p1"));
    assert!(alive(pid_of(&p1.start)));
    a.undo(&ctx_in("staging", 3, 3, true), &stop_old("v2"), Some(&s2.stop_old)).await.unwrap();
    a.undo(&ctx_in("staging", 3, 2, true), &switch("v2"), Some(&s2.switch)).await.unwrap();
    a.undo(&ctx_in("staging", 3, 0, true), &start("v2", &[]), Some(&s2.start)).await.unwrap();
    assert_eq!(release_at(staging).await.as_deref(), Some("v1"));
    assert_eq!(release_at(prod).await.as_deref(), Some("p1"));
    assert_eq!(a.record("prod", "web").unwrap().active.map(|i| i.pid), Some(pid_of(&p1.start)));

    // A staged instance of prod is forgotten by prod's forget only.
    let p2 = a.run(&ctx_in("prod", 4, 0, false), &start("p2", &[])).await.unwrap();
    assert_eq!(a.forget("staging", 4).await, Vec::<String>::new(), "staging's forget leaves prod's instances alone");
    assert!(alive(pid_of(&p2)));
    assert_eq!(a.forget("prod", 4).await.len(), 1);
    eventually("prod's staged p2 exited", Duration::from_secs(5), || async { !alive(pid_of(&p2)) }).await;
    assert_eq!(release_at(prod).await.as_deref(), Some("p1"));
    assert_eq!(release_at(staging).await.as_deref(), Some("v1"));
    assert!(a.record("staging", "web").unwrap().active.is_some_and(|i| i.release == "v1" && alive(i.pid)));

    // A restarted node adopts both; a per-app record of an older node
    // (no destination) is left alone.
    a.shutdown().await;
    std::mem::forget(cleanup);
    drop(a);
    std::fs::write(dir.path().join("apps/old.json"), r#"{"app":"old","route_port":null,"active":null,"staged":null,"retired":null}"#)
        .unwrap();
    let (b, _cleanup) = adapter(dir.path()).await;
    assert_eq!((route_of(&b, "staging"), route_of(&b, "prod")), (staging, prod));
    assert!(b.record("", "old").is_none());
    eventually("both adopted routes answer", Duration::from_secs(10), || async {
        release_at(staging).await.as_deref() == Some("v1") && release_at(prod).await.as_deref() == Some("p1")
    })
    .await;
    b.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_active_instance_is_restarted_on_its_port() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let v1 = deploy(&a, 1, "v1").await;
    let route = route_port(&a);
    let (pid, port) = (pid_of(&v1.start), v1.start["port"].as_u64().unwrap());
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    eventually("a new v1 process runs", Duration::from_secs(10), || async {
        a.record("staging", "web").unwrap().active.is_some_and(|i| i.pid != pid && alive(i.pid))
    })
    .await;
    let active = a.record("staging", "web").unwrap().active.unwrap();
    assert_eq!(active.port as u64, port);
    eventually("the route answers again", Duration::from_secs(10), || async { release_at(route).await.as_deref() == Some("v1") }).await;
    a.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_adopts_its_instances_and_route() {
    let dir = tempfile::tempdir().unwrap();
    let (a, cleanup) = adapter(dir.path()).await;
    let v1 = deploy(&a, 1, "v1").await;
    let route = route_port(&a);
    a.shutdown().await;
    std::mem::forget(cleanup);
    drop(a);
    assert!(alive(pid_of(&v1.start)), "instances outlive the node");

    let (b, _cleanup) = adapter(dir.path()).await;
    let rec = b.record("staging", "web").unwrap();
    assert_eq!(rec.active.as_ref().map(|i| i.pid), Some(pid_of(&v1.start)));
    assert_eq!(route_port(&b), route);
    eventually("the adopted route answers", Duration::from_secs(10), || async { release_at(route).await.as_deref() == Some("v1") }).await;

    // And deploys on from there.
    deploy(&b, 2, "v2").await;
    assert_eq!(release_at(route).await.as_deref(), Some("v2"));
    let v1_pid = pid_of(&v1.start);
    eventually("the adopted v1 was stopped", Duration::from_secs(5), || async { !alive(v1_pid) }).await;
    b.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_command_runs_its_check_script_and_never_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let a = command_adapter(dir.path());
    let flag = dir.path().join("migrated");
    let marker = dir.path().join("ran");
    let action =
        StepAction::Command { run: format!("touch {}", marker.display()), undo: None, check: Some(format!("test -e {}", flag.display())) };
    // Not done yet: the check exits 1.
    assert_eq!(a.check(&ctx(1, 0, false), &action).await.unwrap(), None);
    assert!(!marker.exists(), "check ran the command");

    std::fs::write(&flag, "").unwrap();
    let done = a.check(&ctx(1, 0, false), &action).await.unwrap().expect("the check exits 0: already done");
    assert_eq!(done["ran"], false);
    assert!(done["reason"].as_str().unwrap().contains("already done"), "{done}");
    assert!(!marker.exists(), "check ran the command");

    // No check script: cannot tell.
    let unchecked = StepAction::Command { run: format!("touch {}", marker.display()), undo: None, check: None };
    assert_eq!(a.check(&ctx(1, 0, false), &unchecked).await.unwrap(), None);
    assert!(!marker.exists(), "check ran the command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_start_finds_the_instance_started_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    assert_eq!(a.check(&ctx(5, 0, false), &start("v2", &[])).await.unwrap(), None, "nothing started yet");

    let out = a.run(&ctx(5, 0, false), &start("v2", &[])).await.unwrap();
    let checked = a.check(&ctx(5, 0, false), &start("v2", &[])).await.unwrap().expect("started with this token");
    assert_eq!(checked, out, "check answers what start returned");
    assert_eq!(a.record("staging", "web").unwrap().staged.map(|s| s.pid), Some(pid_of(&out)), "check started nothing");

    // Another deployment's token, another release, another action: not done.
    assert_eq!(a.check(&ctx(6, 0, false), &start("v2", &[])).await.unwrap(), None);
    assert_eq!(a.check(&ctx(5, 0, false), &start("v3", &[])).await.unwrap(), None);
    assert_eq!(a.check(&ctx(5, 1, false), &health("v2", 1000)).await.unwrap(), None);

    // The instance died: not done any more.
    let pid = pid_of(&out);
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    eventually("v2 exited", Duration::from_secs(5), || async { !alive(pid) }).await;
    // The adapter reads the process's state itself: under load it can see
    // the dying process a moment after this test did (seen in CI).
    eventually("check says a dead start is not done", Duration::from_secs(5), || async {
        a.check(&ctx(5, 0, false), &start("v2", &[])).await.unwrap().is_none()
    })
    .await;
    a.stop_all().await;
}

/// Starting an instance waits on the disk (the spawn, the record's
/// fsyncs). That wait must not hold a runtime thread: with a hundred
/// destinations starting at once it held the node's workers, and the
/// other destinations' steps waited behind it. The record's temporary file
/// is made a FIFO here, so writing it blocks until this test reads it;
/// on a one-thread runtime the test's own timer must fire meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn a_start_waiting_on_the_disk_leaves_the_runtime_free() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let apps = dir.path().join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    let fifo = apps.join(".staging+web.json.tmp");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo: {}", std::io::Error::last_os_error());

    // Opens the FIFO (which lets the record's write go on) once the
    // runtime showed it is free, or after 10 s if it never does.
    let free = Arc::new(AtomicBool::new(false));
    let reader = {
        let free = free.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !free.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let was_free = free.load(Ordering::Acquire);
            let _ = std::io::Read::read_to_end(&mut std::fs::File::open(&fifo).unwrap(), &mut Vec::new());
            was_free
        })
    };
    let started = {
        let a = a.clone();
        tokio::spawn(async move { a.run(&ctx(1, 0, false), &start("v1", &[])).await })
    };
    // Let the start reach its record, then show this thread still runs
    // timers while the record's write waits for the reader.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    free.store(true, Ordering::Release);
    let outcome = started.await.unwrap();
    assert!(reader.join().unwrap(), "the runtime's only thread stayed blocked while the start waited on its record");
    // A FIFO cannot be fsynced, so the record was not written: the start
    // fails as a resource error naming the file, and kills what it started.
    let e = outcome.expect_err("a record that cannot be synced fails the start");
    assert_eq!(e.class, ErrorClass::Resource, "{e:?}");
    assert!(e.message.contains("staging+web.json"), "{}", e.message);
    assert_eq!(a.record("staging", "web").and_then(|r| r.staged), None, "a start whose record failed stays unrecorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_stops_the_staged_instance_of_its_token_and_spares_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _cleanup) = adapter(dir.path()).await;
    let v1 = deploy(&a, 1, "v1").await;
    let route = route_port(&a);
    let v2 = a.run(&ctx(2, 0, false), &start("v2", &[])).await.unwrap();
    let (v2_pid, v2_port) = (pid_of(&v2), v2["port"].as_u64().unwrap() as u16);

    // v1 serves the route with token 1: forgetting token 1 leaves it.
    assert_eq!(a.forget("staging", 1).await, Vec::<String>::new());
    assert_eq!(a.record("staging", "web").unwrap().active.map(|i| i.pid), Some(pid_of(&v1.start)));
    assert!(alive(v2_pid), "forget of token 1 stopped the instance of token 2");

    let removed = a.forget("staging", 2).await;
    assert_eq!(removed, vec![format!("stopped staged web@v2 (pid {v2_pid}, port {v2_port})")]);
    assert!(!alive(v2_pid), "v2 still runs after forget returned");
    assert!(port_refuses(v2_port).await, "v2's port {v2_port} still answers");
    let rec = a.record("staging", "web").unwrap();
    assert!(rec.staged.is_none(), "{rec:?}");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(dir.path().join("apps/staging+web.json")).unwrap()).unwrap();
    assert_eq!(on_disk["staged"], Value::Null);
    assert_eq!(on_disk["active"]["release"], "v1");
    assert!(alive(pid_of(&v1.start)));
    assert_eq!(release_at(route).await.as_deref(), Some("v1"), "the route still serves v1");

    // Again: nothing left to remove.
    assert_eq!(a.forget("staging", 2).await, Vec::<String>::new());
    a.stop_all().await;
}

// -------------------------------------------------------------------- agent

struct Node {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    results: tokio::sync::mpsc::UnboundedReceiver<StepResult>,
    witness: PathBuf,
    data: PathBuf,
    _cleanup: Cleanup,
}

async fn node() -> Node {
    node_with(|_| {}).await
}

async fn node_with(tune: impl FnOnce(&mut ProcessConfig)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cfg = config(&data);
    tune(&mut cfg);
    let (a, cleanup) = adapter_with(cfg).await;
    let witness = dir.path().join("witness.jsonl");
    let (agent, results) = Agent::new(
        "node-1".into(),
        adapters(a, &data),
        Fencing::open(&data).unwrap(),
        Some(Witness::open(&witness).unwrap()),
        Some(data.join("results.json")),
    );
    Node { _dir: dir, agent, results, witness, data, _cleanup: cleanup }
}

fn key(deployment: &str, step: u32, token: u64) -> StepKey {
    StepKey { deployment: deployment.into(), step, undo: false, attempt: 1, token, epoch: 1 }
}

fn assign(k: &StepKey, action: &StepAction, timeout_ms: u64) -> StepAssignment {
    StepAssignment {
        key: Some(k.clone()),
        destination: "staging".into(),
        app: "web".into(),
        release: "v1".into(),
        action_json: serde_json::to_string(action).unwrap(),
        run_output_json: String::new(),
        timeout_ms,
        check_first: false,
        adapter: String::new(),
    }
}

/// `assign`, handed over from a lost node: epoch 2, check first.
fn handed_over(k: &StepKey, action: &StepAction, timeout_ms: u64) -> StepAssignment {
    let mut k = k.clone();
    k.epoch = 2;
    StepAssignment { check_first: true, ..assign(&k, action, timeout_ms) }
}

fn witness_lines(n: &Node) -> Vec<Value> {
    std::fs::read_to_string(&n.witness).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `apps/staging+web.json` of the node's process adapter (Null while missing).
fn web_state(n: &Node) -> Value {
    std::fs::read(n.data.join("apps/staging+web.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null)
}

fn command(run: &str) -> StepAction {
    StepAction::Command { run: run.into(), undo: None, check: None }
}

async fn next(n: &mut Node) -> StepResult {
    tokio::time::timeout(Duration::from_secs(20), n.results.recv()).await.expect("a result within 20 s").expect("results channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_once_per_key_and_report_failures() {
    let mut n = node().await;
    let marker = n.data.join("ran");
    let run = format!("echo run >> {}", marker.display());
    let k = key("d1", 0, 1);
    n.agent.assign(assign(&k, &command(&run), 10_000));
    let first = next(&mut n).await;
    assert!(first.ok, "{}", first.error);
    // In the journal file before it went out (synced while it travels), so
    // a node killed now still has it.
    let journal = std::fs::read_to_string(n.data.join("results.json")).unwrap();
    assert!(journal.lines().count() == 1 && journal.contains(r#""deployment":"d1""#), "{journal}");
    let out: Value = serde_json::from_str(&first.output_json).unwrap();
    assert_eq!(out["ran"], true);

    // The same key again: the recorded result, not a second run.
    n.agent.assign(assign(&k, &command(&run), 10_000));
    let again = next(&mut n).await;
    assert_eq!(again, first);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");

    // A check that passes skips the run.
    let k2 = key("d1", 1, 1);
    let checked = StepAction::Command { run: run.clone(), undo: None, check: Some("true".into()) };
    n.agent.assign(assign(&k2, &checked, 10_000));
    let r = next(&mut n).await;
    assert!(r.ok);
    assert_eq!(serde_json::from_str::<Value>(&r.output_json).unwrap()["ran"], false);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");

    // A failing command: class invalid, with its output.
    let k3 = key("d1", 2, 1);
    n.agent.assign(assign(&k3, &command("echo disk is full >&2; exit 4"), 10_000));
    let r = next(&mut n).await;
    assert!(!r.ok);
    assert_eq!(r.error_class, WireClass::Invalid as i32);
    assert!(r.error.contains("exited with status 4") && r.error.contains("disk is full"), "{}", r.error);

    // Undo runs the undo command.
    let undo_marker = n.data.join("undone");
    let with_undo = StepAction::Command { run: "true".into(), undo: Some(format!("touch {}", undo_marker.display())), check: None };
    let mut uk = key("d1", 3, 1);
    uk.undo = true;
    n.agent.assign(assign(&uk, &with_undo, 10_000));
    assert!(next(&mut n).await.ok);
    assert!(undo_marker.exists());

    // Every action left a witness line.
    let lines: Vec<Value> = std::fs::read_to_string(&n.witness).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let w = &lines[0];
    for field in ["node", "destination", "deployment", "step", "undo", "attempt", "token", "action", "start_ms", "end_ms", "ok"] {
        assert!(w.get(field).is_some(), "witness line lacks {field}: {w}");
    }
    assert_eq!((w["node"].as_str(), w["action"].as_str(), w["ok"].as_bool()), (Some("node-1"), Some("command"), Some(true)));
    assert_eq!(lines[2]["ok"], false);
    assert_eq!(lines[3]["undo"], true);
    assert!(lines.iter().all(|l| l["start_ms"].as_i64() <= l["end_ms"].as_i64()));
    assert_eq!(n.agent.recent_results(2).len(), 2);

    // A restarted node remembers the results (journal): the same key is
    // answered, not run again.
    let (a2, _cleanup2) = adapter(&n.data).await;
    let journal = Some(n.data.join("results.json"));
    let (agent2, mut results2) = Agent::new("node-1".into(), adapters(a2, &n.data), Fencing::open(&n.data).unwrap(), None, journal);
    assert_eq!(agent2.recent_results(100).len(), 4);
    agent2.assign(assign(&k, &command(&run), 10_000));
    let replayed = tokio::time::timeout(Duration::from_secs(20), results2.recv()).await.unwrap().unwrap();
    assert_eq!(replayed, first);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_fencing_tokens_are_refused_and_remembered() {
    let mut n = node().await;
    n.agent.assign(assign(&key("new", 0, 7), &command("true"), 10_000));
    assert!(next(&mut n).await.ok);

    let marker = n.data.join("must-not-exist");
    n.agent.assign(assign(&key("old", 0, 5), &command(&format!("touch {}", marker.display())), 10_000));
    let r = next(&mut n).await;
    assert!(!r.ok);
    assert_eq!(r.error_class, WireClass::Invalid as i32);
    assert_eq!(
        r.error,
        "stale fencing token 5 < highest seen 7 for destination staging; this step belongs to a deployment that no longer holds the lock"
    );
    assert!(!marker.exists());
    // Durable: a restarted node still refuses it.
    assert_eq!(Fencing::open(&n.data).unwrap().highest("staging"), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_is_killed_and_reported_transient() {
    let mut n = node().await;
    let pidfile = n.data.join("pid");
    let run = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let k = key("d", 0, 1);
    n.agent.assign(assign(&k, &command(&run), 500));
    // While it runs, a repeat of the key does nothing and Hello would list it.
    eventually("the command started", Duration::from_secs(10), || async { pidfile.exists() }).await;
    assert_eq!(n.agent.running(), vec![k.clone()]);
    n.agent.assign(assign(&k, &command(&run), 500));
    let r = next(&mut n).await;
    assert!(!r.ok);
    assert_eq!(r.error_class, WireClass::Transient as i32);
    assert!(r.error.contains("timed out after 500ms"), "{}", r.error);
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    eventually("the command was killed", Duration::from_secs(5), || async { !alive(pid) }).await;
    assert!(n.agent.running().is_empty());
    // Only one result for the key.
    assert!(tokio::time::timeout(Duration::from_millis(200), n.results.recv()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_stops_a_running_step_and_reports_aborted() {
    // A long start-up grace, so that the start below is still running
    // when the abort arrives.
    let mut n = node_with(|c| c.exit_grace = Duration::from_secs(60)).await;
    let pidfile = n.data.join("pid");
    let k = key("d", 0, 1);
    let slow = StepAction::Command { run: format!("echo $$ > {}; exec sleep 30", pidfile.display()), undo: None, check: None };
    n.agent.assign(assign(&k, &slow, 60_000));
    eventually("the command started", Duration::from_secs(10), || async { pidfile.exists() }).await;
    n.agent.abort(Abort { key: Some(k.clone()), reason: "deployment cancelled by alice".into() });
    let r = next(&mut n).await;
    assert!(!r.ok);
    assert_eq!(r.error_class, WireClass::Aborted as i32);
    assert!(r.error.contains("deployment cancelled by alice"), "{}", r.error);
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    eventually("the command was killed", Duration::from_secs(5), || async { !alive(pid) }).await;

    // The process adapter's start, aborted during its start-up grace: the
    // instance it started is stopped and forgotten.
    let k2 = key("d", 1, 1);
    n.agent.assign(assign(&k2, &start("v9", &[]), 120_000));
    let web_json = n.data.join("apps/staging+web.json");
    let state = || -> Value { std::fs::read(&web_json).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null) };
    eventually("v9 was staged", Duration::from_secs(10), || async { state()["staged"]["release"] == "v9" }).await;
    let pid = state()["staged"]["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));
    n.agent.abort(Abort { key: Some(k2.clone()), reason: String::new() });
    let r = next(&mut n).await;
    assert!(!r.ok);
    assert_eq!(r.error_class, WireClass::Aborted as i32);
    assert!(!alive(pid), "the aborted start's instance was stopped before the result");
    assert_eq!(state()["staged"], Value::Null, "the aborted start's instance is forgotten");
    // The witness line of the aborted start ends after its cleanup.
    let lines = std::fs::read_to_string(&n.witness).unwrap();
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!((last["action"].as_str(), last["ok"].as_bool()), (Some("start"), Some(false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_step_whose_check_says_done_is_not_run_again() {
    let mut n = node().await;
    // A start on this node, then the same step handed over (epoch 2).
    let k = key("d", 0, 3);
    n.agent.assign(assign(&k, &start("v1", &[]), 60_000));
    let first = next(&mut n).await;
    assert!(first.ok, "{}", first.error);
    n.agent.assign(handed_over(&k, &start("v1", &[]), 60_000));
    let again = next(&mut n).await;
    assert!(again.ok, "{}", again.error);
    assert_eq!(again.key.as_ref().map(|k| k.epoch), Some(2));
    let (out1, out2): (Value, Value) =
        (serde_json::from_str(&first.output_json).unwrap(), serde_json::from_str(&again.output_json).unwrap());
    assert_eq!(out2, out1, "the check answers with the first start's output");
    // A second run would have replaced the staged instance.
    assert_eq!(web_state(&n)["staged"]["pid"].as_u64(), Some(pid_of(&out1) as u64));
    assert!(alive(pid_of(&out1)));
    assert_eq!(witness_lines(&n).last().unwrap()["action"], "check");

    // A command whose check passes: not run, witnessed as `check`.
    let marker = n.data.join("ran");
    let flag = n.data.join("done");
    let cmd = StepAction::Command {
        run: format!("touch {}", marker.display()),
        undo: Some(format!("touch {}", n.data.join("undone").display())),
        check: Some(format!("test -e {}", flag.display())),
    };
    std::fs::write(&flag, "").unwrap();
    n.agent.assign(handed_over(&key("d", 1, 3), &cmd, 10_000));
    let r = next(&mut n).await;
    assert!(r.ok, "{}", r.error);
    assert_eq!(serde_json::from_str::<Value>(&r.output_json).unwrap()["ran"], false);
    assert!(!marker.exists());
    assert_eq!(witness_lines(&n).last().unwrap()["action"], "check");

    // Its check fails: run as usual.
    std::fs::remove_file(&flag).unwrap();
    n.agent.assign(handed_over(&key("d", 2, 3), &cmd, 10_000));
    let r = next(&mut n).await;
    assert!(r.ok, "{}", r.error);
    assert!(marker.exists(), "a handed-over step that is not done runs");
    assert_eq!(witness_lines(&n).last().unwrap()["action"], "command");

    // An undo is never skipped by a check (the check passes here).
    std::fs::write(&flag, "").unwrap();
    let mut uk = key("d", 1, 3);
    uk.undo = true;
    n.agent.assign(handed_over(&uk, &cmd, 10_000));
    let r = next(&mut n).await;
    assert!(r.ok, "{}", r.error);
    assert!(n.data.join("undone").exists(), "the undo ran");
    assert_eq!(witness_lines(&n).last().unwrap()["action"], "command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_aborts_stale_steps_and_removes_the_staged_instance() {
    let mut n = node().await;
    n.agent.assign(assign(&key("d", 0, 4), &start("v1", &[]), 60_000));
    let r = next(&mut n).await;
    assert!(r.ok, "{}", r.error);
    let staged = pid_of(&serde_json::from_str(&r.output_json).unwrap());

    // A step of the deployment and one of another deployment still run.
    let pidfile = n.data.join("pid");
    let slow = StepAction::Command { run: format!("echo $$ > {}; exec sleep 30", pidfile.display()), undo: None, check: None };
    let stale = key("d", 1, 4);
    n.agent.assign(assign(&stale, &slow, 60_000));
    let other = key("other", 0, 4);
    n.agent.assign(assign(&other, &command("exec sleep 30"), 60_000));
    eventually("the command started", Duration::from_secs(10), || async { pidfile.exists() }).await;

    let forget = fleet_proto::Forget {
        deployment: "d".into(),
        destination: "staging".into(),
        token: 4,
        epoch: 2,
        reason: "node-1 was presumed lost".into(),
    };
    n.agent.forget(forget.clone());
    let r = next(&mut n).await;
    assert_eq!(r.key.as_ref(), Some(&stale));
    assert_eq!(r.error_class, WireClass::Aborted as i32);
    assert!(r.error.contains("node-1 was presumed lost"), "{}", r.error);
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    eventually("the aborted command was killed", Duration::from_secs(5), || async { !alive(pid) }).await;
    eventually("the staged instance was removed", Duration::from_secs(10), || async {
        web_state(&n)["staged"].is_null() && !alive(staged)
    })
    .await;
    assert_eq!(n.agent.running(), vec![other.clone()], "another deployment's step is left alone");

    // Again: nothing to abort, nothing reported.
    n.agent.forget(forget);
    assert!(tokio::time::timeout(Duration::from_millis(200), n.results.recv()).await.is_err());
    assert_eq!(n.agent.running(), vec![other.clone()]);
    n.agent.abort(Abort { key: Some(other), reason: String::new() });
    assert_eq!(next(&mut n).await.error_class, WireClass::Aborted as i32);
}

#[test]
fn step_errors_carry_their_class() {
    let e = StepError::transient("x");
    assert_eq!((e.class, e.to_string()), (ErrorClass::Transient, "x".to_string()));
}
