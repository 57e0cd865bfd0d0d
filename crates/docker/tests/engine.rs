//! Against the real Docker Engine of this machine (CI has one). Images are built here `FROM
//! scratch`; nothing is pulled from a registry. Each test labels its containers with its own
//! destination, removes them in a guard, and checks that none is left.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_core::deploy::ErrorClass;
use fleet_docker::testimage::{build_web_image, WebImage, WEB_PORT};
use fleet_docker::{
    BindMount, ContainerSpec, DockerError, Engine, FleetLabels, Health, ImagePresence, LabelFilter, Limits, PortSpec, PullPolicy, Removal,
    RunState, LABEL_APP, LABEL_DEPLOYMENT, LABEL_DESTINATION, LABEL_MANAGED, LABEL_RELEASE, LABEL_TOKEN, REQUIRED_API,
};

const STEP: Duration = Duration::from_secs(60);

async fn engine() -> Engine {
    let socket = fleet_docker::socket_from_env().unwrap_or_else(|e| panic!("{e}"));
    match Engine::connect_with(&socket, STEP).await {
        Ok(engine) => engine,
        Err(e) => panic!(
            "these tests run against the Docker Engine of this machine and could not reach it: {e}\n\
             (start dockerd, or set DOCKER_HOST to its unix socket)"
        ),
    }
}

/// A destination name no other test (or earlier run) uses.
fn unique(test: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("t-{test}-{}-{nanos}", std::process::id())
}

fn labels(destination: &str, release: &str, token: u64) -> FleetLabels {
    FleetLabels {
        app: "web".into(),
        release: release.into(),
        destination: destination.into(),
        deployment: format!("dep-{token}"),
        token,
        node: String::new(),
    }
}

fn web_spec(image: &str) -> ContainerSpec {
    ContainerSpec { ports: vec![PortSpec::loopback(WEB_PORT)], pull: PullPolicy::Never, ..ContainerSpec::new(image) }
}

async fn web_image(engine: &Engine, release: &str) -> String {
    build_web_image(engine, &WebImage::new(format!("fleet-test/web:{release}"), release)).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Removes every container of the test's destination (and any named extra) when dropped, also
/// when the test panics.
struct Cleanup {
    engine: Engine,
    destination: String,
    names: Vec<String>,
}

impl Cleanup {
    fn new(engine: &Engine, destination: &str) -> Cleanup {
        Cleanup { engine: engine.clone(), destination: destination.to_string(), names: Vec::new() }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let engine = self.engine.clone();
        let destination = self.destination.clone();
        let names = std::mem::take(&mut self.names);
        // Drop cannot await; a fresh runtime on its own thread can, inside or outside a runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(left) = engine.list(&LabelFilter::managed().destination(&destination)).await {
                    for c in left {
                        let _ = engine.stop_and_remove(&c.id, Duration::ZERO).await;
                    }
                }
                for name in names {
                    let _ = engine.stop_and_remove(&name, Duration::ZERO).await;
                }
            })
        })
        .join();
    }
}

async fn assert_nothing_left(engine: &Engine, destination: &str) {
    let left = engine.list(&LabelFilter::managed().destination(destination)).await.unwrap();
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

/// One HTTP/1.0 GET; the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("unexpected answer: {response:?}"))),
    }
}

/// Polls `GET path` until the body is `want` or `within` passes.
async fn get_until(addr: SocketAddr, path: &str, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let last = http_get(addr, path);
        match &last {
            Ok(body) if body == want => return body.clone(),
            _ if Instant::now() >= deadline => panic!("GET http://{addr}{path} did not answer {want:?} within {within:?}: {last:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn speaks_the_pinned_api_version_to_this_engine() {
    let engine = engine().await;
    assert!(engine.engine_api() >= REQUIRED_API, "engine API {}", engine.engine_api());
    // An engine that accepts 1.41 (this one: `docker version` says API 1.41) is spoken to in 1.41,
    // whatever bollard's default is; one that no longer does, in the newest version both know.
    if engine.engine_min_api() <= REQUIRED_API {
        assert_eq!(engine.client_api(), REQUIRED_API);
    } else {
        assert!(engine.client_api() >= engine.engine_min_api() && engine.client_api() <= engine.engine_api());
    }
    assert!(fleet_docker::engine::newest_known_api() > REQUIRED_API);
    // And a request in that version works.
    engine.list(&LabelFilter::managed().destination(&unique("api"))).await.unwrap();
}

#[tokio::test]
async fn runs_two_releases_side_by_side_serves_labels_lists_and_removes() {
    let engine = engine().await;
    let dest = unique("serve");
    let _cleanup = Cleanup::new(&engine, &dest);
    let (v1, v2) = (web_image(&engine, "v1").await, web_image(&engine, "v2").await);
    let data = tempfile::tempdir().unwrap();

    let blue = labels(&dest, "v1", 1);
    let spec = ContainerSpec {
        volumes: vec![BindMount { host_path: data.path().to_path_buf(), container_path: "/data".into(), read_only: true }],
        limits: Limits { memory_bytes: Some(64 << 20), nano_cpus: Some(500_000_000) },
        labels: [("team".to_string(), "blue".to_string())].into(),
        ..web_spec("fleet-test/web:{release}")
    };
    let started = engine.create_and_start(&spec, &blue).await.unwrap();
    assert!(!started.adopted);
    assert_eq!(started.name, blue.container_name());
    let green = labels(&dest, "v2", 2);
    let started2 = engine.create_and_start(&web_spec(&v2), &green).await.unwrap();

    let info = engine.inspect(&started.name).await.unwrap().expect("the container exists");
    assert_eq!(info.id, started.id);
    assert_eq!(info.image, v1);
    assert_eq!(info.state, RunState::Running);
    assert_eq!(info.fleet.as_ref(), Some(&blue));
    for (key, value) in [
        (LABEL_APP, "web"),
        (LABEL_RELEASE, "v1"),
        (LABEL_DESTINATION, dest.as_str()),
        (LABEL_DEPLOYMENT, "dep-1"),
        (LABEL_TOKEN, "1"),
        (LABEL_MANAGED, "true"),
        ("team", "blue"),
    ] {
        assert_eq!(info.labels.get(key).map(String::as_str), Some(value), "label {key}");
    }
    let raw = engine.client().inspect_container(&started.id, None).await.unwrap().host_config.unwrap();
    assert_eq!(raw.memory, Some(64 << 20));
    assert_eq!(raw.nano_cpus, Some(500_000_000));
    assert_eq!(raw.binds, Some(vec![format!("{}:/data:ro", data.path().display())]));

    // Published on an engine-chosen port of the loopback address only.
    let addr1 = info.host_port(WEB_PORT).expect("8080 is published");
    assert!(addr1.ip().is_loopback() && addr1.port() != 0, "{addr1}");
    let addr2 = engine.inspect(&started2.id).await.unwrap().unwrap().host_port(WEB_PORT).unwrap();
    assert_ne!(addr1, addr2);
    get_until(addr1, "/", "release=v1\n", STEP).await;
    get_until(addr2, "/", "release=v2\n", STEP).await;

    // The image's own HEALTHCHECK passes.
    let settled = engine.wait_for_health(&started.id, STEP).await.unwrap().unwrap();
    assert_eq!(settled.health, Health::Healthy);

    let all = engine.list(&LabelFilter::managed().destination(&dest)).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let only_v2 = engine.list(&LabelFilter::managed().destination(&dest).release("v2")).await.unwrap();
    assert_eq!(only_v2.len(), 1);
    assert_eq!(only_v2[0].id, started2.id);
    assert_eq!(only_v2[0].fleet.as_ref(), Some(&green));
    assert_eq!(only_v2[0].state, RunState::Running);

    // Stop + remove is idempotent: gone already is success.
    assert_eq!(engine.stop_and_remove(&started.name, Duration::from_secs(5)).await.unwrap(), Removal::Removed);
    assert_eq!(engine.stop_and_remove(&started.name, Duration::from_secs(5)).await.unwrap(), Removal::AlreadyGone);
    assert_eq!(engine.inspect(&started.name).await.unwrap(), None);
    assert!(http_get(addr1, "/").is_err(), "the old container no longer serves");
    get_until(addr2, "/", "release=v2\n", STEP).await;
    assert_eq!(engine.stop_and_remove(&started2.id, Duration::from_secs(5)).await.unwrap(), Removal::Removed);
    assert_nothing_left(&engine, &dest).await;
}

#[tokio::test]
async fn a_retried_create_adopts_its_own_container() {
    let engine = engine().await;
    let dest = unique("adopt");
    let _cleanup = Cleanup::new(&engine, &dest);
    let image = web_image(&engine, "v1").await;
    // A present image is not pulled again (nothing could be pulled here anyway).
    assert_eq!(engine.ensure_image(&image, PullPolicy::Missing).await.unwrap(), ImagePresence::AlreadyPresent);
    assert_eq!(engine.ensure_image(&image, PullPolicy::Never).await.unwrap(), ImagePresence::AlreadyPresent);
    let l = labels(&dest, "v1", 5);
    let first = engine.create_and_start(&web_spec(&image), &l).await.unwrap();
    let again = engine.create_and_start(&web_spec(&image), &l).await.unwrap();
    assert!(again.adopted);
    assert_eq!(again.id, first.id);

    // A stopped container of the same step is adopted and started again.
    engine.client().stop_container(&first.id, None).await.unwrap();
    assert_eq!(engine.inspect(&first.id).await.unwrap().unwrap().state, RunState::Exited);
    let third = engine.create_and_start(&web_spec(&image), &l).await.unwrap();
    assert!(third.adopted);
    let info = engine.inspect(&first.id).await.unwrap().unwrap();
    assert_eq!(info.state, RunState::Running);
    get_until(info.host_port(WEB_PORT).unwrap(), "/", "release=v1\n", STEP).await;

    assert_eq!(engine.list(&LabelFilter::managed().destination(&dest)).await.unwrap().len(), 1);
    engine.stop_and_remove(&first.id, Duration::from_secs(5)).await.unwrap();
    assert_nothing_left(&engine, &dest).await;
}

#[tokio::test]
async fn a_name_taken_by_a_container_that_is_not_ours_is_a_resource_conflict() {
    let engine = engine().await;
    let dest = unique("foreign");
    let mut cleanup = Cleanup::new(&engine, &dest);
    let image = web_image(&engine, "v1").await;
    let l = labels(&dest, "v1", 9);
    // Someone created a container under the name Fleet would use, without Fleet's labels.
    let name = l.container_name();
    cleanup.names.push(name.clone());
    let options = bollard::query_parameters::CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
    let body = bollard::models::ContainerCreateBody { image: Some(image.clone()), ..Default::default() };
    engine.client().create_container(Some(options), body).await.unwrap();

    let err = engine.create_and_start(&web_spec(&image), &l).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DockerError::NameConflict { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Resource);
    assert!(err.to_string().contains(&name), "{err}");
    // The foreign container is left alone.
    let foreign = engine.inspect(&name).await.unwrap().expect("still there");
    assert_eq!(foreign.fleet, None);
    engine.stop_and_remove(&name, Duration::ZERO).await.unwrap();
    assert_nothing_left(&engine, &dest).await;
}

#[tokio::test]
async fn an_image_whose_health_check_fails_is_reported_unhealthy() {
    let engine = engine().await;
    let dest = unique("unhealthy");
    let _cleanup = Cleanup::new(&engine, &dest);
    let image = build_web_image(&engine, &WebImage::unhealthy("fleet-test/web:v3-unhealthy", "v3")).await.unwrap();
    let started = engine.create_and_start(&web_spec(&image), &labels(&dest, "v3", 3)).await.unwrap();
    let info = engine.wait_for_health(&started.id, STEP).await.unwrap().unwrap();
    assert_eq!(info.health, Health::Unhealthy, "{info:?}");
    // It still serves: only the health check says no.
    assert!(info.is_running());
    get_until(info.host_port(WEB_PORT).unwrap(), "/", "release=v3\n", STEP).await;
    engine.stop_and_remove(&started.id, Duration::from_secs(5)).await.unwrap();
    assert_nothing_left(&engine, &dest).await;
}

#[tokio::test]
async fn pull_never_with_a_missing_image_is_invalid_and_names_the_image() {
    let engine = engine().await;
    let dest = unique("never");
    let _cleanup = Cleanup::new(&engine, &dest);
    let image = format!("fleet-test/absent:{}", std::process::id());
    let err = engine.ensure_image(&image, PullPolicy::Never).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DockerError::ImageMissing { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Invalid);
    assert!(err.to_string().contains(&image), "{err}");

    let err = engine.create_and_start(&web_spec(&image), &labels(&dest, "v1", 1)).await.unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.class(), ErrorClass::Invalid);
    assert!(err.to_string().contains(&image), "{err}");
    assert_nothing_left(&engine, &dest).await;
}

#[tokio::test]
async fn a_missing_socket_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let err = Engine::connect_socket(&socket).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DockerError::SocketMissing { .. }), "{err:?}");
    assert!(err.to_string().contains(&socket.display().to_string()), "{err}");
    assert!(err.to_string().contains("DOCKER_HOST"), "says what to do: {err}");
    assert_eq!(err.class(), ErrorClass::Transient);
}

#[tokio::test]
async fn a_refused_socket_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    // A socket file nobody listens on any more: connections are refused.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let err = Engine::connect_socket(&socket).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DockerError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert_eq!(err.class(), ErrorClass::Transient);
}

#[tokio::test]
async fn a_host_port_in_use_is_a_resource_error_and_leaves_nothing() {
    let engine = engine().await;
    let dest = unique("port");
    let _cleanup = Cleanup::new(&engine, &dest);
    let image = web_image(&engine, "v1").await;
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let spec = ContainerSpec { ports: vec![PortSpec { host_port: Some(port), ..PortSpec::loopback(WEB_PORT) }], ..web_spec(&image) };
    let err = engine.create_and_start(&spec, &labels(&dest, "v1", 1)).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DockerError::PortInUse { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Resource);
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert_nothing_left(&engine, &dest).await;
}

/// A registry on loopback that refuses every credential, as a registry does for a wrong password.
struct RefusingRegistry {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl RefusingRegistry {
    fn start() -> RefusingRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut served = 0;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let n = conn.read(&mut buf).unwrap_or(0);
                        // The engine tries TLS first; close, and it falls back to plain HTTP.
                        if n == 0 || buf[0] == 0x16 {
                            continue;
                        }
                        served += 1;
                        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                        let _ = write!(
                            conn,
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"fleet-test\"\r\n\
                             Docker-Distribution-API-Version: registry/2.0\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            served
        });
        RefusingRegistry { addr, stop, thread: Some(thread) }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap_or(0)).unwrap_or(0)
    }
}

impl Drop for RefusingRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn write_config(dir: &Path, registry: &str) -> std::path::PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("fleet:wrong-password");
    let path = dir.join("config.json");
    std::fs::write(&path, format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#)).unwrap();
    path
}

#[tokio::test]
async fn a_registry_refusing_the_credentials_is_an_auth_error() {
    let registry = RefusingRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &registry.addr.to_string());
    let engine = engine().await.with_docker_config(&config);
    let image = format!("{}/fleet-test/private:v1", registry.addr);
    let err = engine.ensure_image(&image, PullPolicy::Always).await.unwrap_err();
    eprintln!("{err}");
    let served = registry.finish();
    assert!(served > 0, "the engine never asked the registry: {err}");
    assert!(matches!(err, DockerError::Auth { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Auth);
    let msg = err.to_string();
    assert!(msg.contains(&image) && msg.contains(&config.display().to_string()) && msg.contains("docker login"), "{msg}");
}
