//! The dashboard (`GET /` on every coordinator's HTTPS API) in a real
//! browser: Debian's headless Chromium driven through WebDriver
//! (`chromedriver`) with fantoccini, against a real cluster with two nodes.
//!
//! What it shows, read from the rendered page only (never a reload):
//! an operator signed in with a bearer token (`#token=` in the URL) sees a
//! deployment submitted with `fleetctl` appear in the list, opens it, and
//! watches it go from `queued` (the destination held by a lock) through
//! `running` to `succeeded` with every step `succeeded`, the same steps
//! `fleetctl status` lists; the action buttons follow the role and the
//! state (cancel while queued, rollback once it succeeded; none at all for
//! a viewer's token); the event stream indicator is live; and the page has
//! no horizontal scrolling at a phone's 390 px width in any view.
//! Screenshots of the detail view (desktop and phone width) are written to
//! `$CARGO_TARGET_DIR/artifacts/` (else `target/artifacts/`).
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and
//! `chromium-driver`; `cargo xtask test` installs them) and the binaries
//! built: `cargo build --workspace --exclude fleet-bench --all-targets`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use fantoccini::{Client, Locator};
use fleet_core::deploy::DeployState;
use fleet_tests::harness::{eventually, http_get_path, owned_processes, Cluster, Fleet, OWNER_ENV};
use serde::de::DeserializeOwned;
use serde::Deserialize;

const STAGING: &str = "destinations:\n  - name: staging\n    selector: { env: staging }\n";
const HEALTH: &str = "{ http: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 2, deadline: 10s }";
/// How long the page may take to show what the cluster already did.
const PAGE_WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ the browser

/// `chromedriver` and the headless Chromium it starts, with a WebDriver
/// session. Both run with `FLEET_TEST_OWNER` set to the browser's own
/// directory, so whatever is left of them is found and killed (by pid) on
/// drop, even after a failed test.
struct Browser {
    client: Option<Client>,
    driver: Option<Child>,
    dir: PathBuf,
}

fn find_command(name: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().context("running sh")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        bail!(
            "`{name}` is not installed: the dashboard test drives Debian's headless Chromium. Run `cargo xtask test`, which \
             installs `chromium` and `chromium-driver` (or `apt-get install chromium chromium-driver`)"
        );
    }
    Ok(PathBuf::from(path))
}

/// A port nobody listens on right now (chromedriver has no `--port=0`).
/// Another process may take it before chromedriver does: the caller retries.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Browser {
    async fn start(dir: &Path) -> anyhow::Result<Browser> {
        let chromium = find_command("chromium")?;
        let chromedriver = find_command("chromedriver")?;
        std::fs::create_dir_all(dir)?;
        let mut browser = Browser { client: None, driver: None, dir: dir.to_path_buf() };
        let mut tries = vec![];
        for _ in 0..5 {
            let port = free_port()?;
            let log = dir.join(format!("chromedriver-{port}.log"));
            let child = Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .env(OWNER_ENV, dir)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", chromedriver.display()))?;
            browser.driver = Some(child);
            match browser.driver_ready(port).await {
                Ok(()) => {
                    browser.client = Some(connect(port, &chromium, dir).await?);
                    return Ok(browser);
                }
                Err(e) => {
                    tries.push(format!("port {port}: {e:#}"));
                    browser.kill_driver();
                }
            }
        }
        bail!("chromedriver did not start: {}", tries.join("; "))
    }

    /// Poll chromedriver's `/status` until it answers, or fail at once if it
    /// exited (its port was taken).
    async fn driver_ready(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = format!("127.0.0.1:{port}");
        loop {
            if let Some(status) = self.driver.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("chromedriver exited ({status})");
            }
            if http_get_path(&addr, "/status", Duration::from_secs(1)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on {addr} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill_driver(&mut self) {
        if let Some(mut c) = self.driver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("connected in Browser::start")
    }

    /// Run `script` (a function body; `return` its value) in the page.
    async fn js<T: DeserializeOwned>(&self, script: &str) -> anyhow::Result<T> {
        let v = self.client().execute(script, vec![]).await.with_context(|| format!("running in the page: {script}"))?;
        serde_json::from_value(v.clone()).with_context(|| format!("the page answered {v} to: {script}"))
    }

    async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client().goto(url).await.with_context(|| format!("opening {url}"))
    }

    /// Click `css` once the page shows it (it may still be loading).
    async fn click(&self, css: &str) -> anyhow::Result<()> {
        let found = |c: &Client| {
            let c = c.clone();
            async move { c.find(Locator::Css(css)).await.ok() }
        };
        let el = eventually(&format!("{css} on the page"), PAGE_WAIT, || async { Ok(found(self.client()).await) }).await?;
        el.click().await.with_context(|| format!("clicking {css}"))
    }

    async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let png = self.client().screenshot().await.context("taking a screenshot")?;
        ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        println!("dashboard screenshot: {}", path.display());
        Ok(())
    }

    /// End the session (chromedriver closes Chromium), then chromedriver.
    async fn close(mut self) -> anyhow::Result<()> {
        if let Some(c) = self.client.take() {
            c.close().await.context("closing the WebDriver session")?;
        }
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill_driver();
        for (pid, _) in owned_processes(&self.dir) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).stderr(Stdio::null()).status();
        }
    }
}

/// A WebDriver session with headless Chromium. WebDriver itself is plain
/// HTTP on 127.0.0.1, so fantoccini needs no TLS of its own.
async fn connect(port: u16, chromium: &Path, dir: &Path) -> anyhow::Result<Client> {
    let mut caps = fantoccini::wd::Capabilities::new();
    caps.insert("browserName".into(), serde_json::json!("chrome"));
    // The coordinators' HTTPS certificate is signed by the cluster's own CA
    // (`fleetctl certs init`), which this browser does not know: accept it,
    // as `--ignore-certificate-errors` below does for the page's own fetches.
    caps.insert("acceptInsecureCerts".into(), serde_json::json!(true));
    let args = [
        "--headless=new".to_string(),
        // Tests run as root, where Chromium's sandbox refuses to start.
        "--no-sandbox".to_string(),
        // See acceptInsecureCerts: the cluster CA is not in the browser's trust store.
        "--ignore-certificate-errors".to_string(),
        "--window-size=1280,900".to_string(),
        "--disable-dev-shm-usage".to_string(),
        "--no-first-run".to_string(),
        "--disable-extensions".to_string(),
        format!("--user-data-dir={}", dir.join("profile").display()),
    ];
    caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": chromium, "args": args }));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    fantoccini::ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .context("starting headless Chromium through chromedriver")
}

// ------------------------------------------------------- what the page shows

/// The header, as the page renders it.
#[derive(Debug, Deserialize)]
struct Header {
    /// `data-role` of the signed-in user (empty when signed out).
    role: String,
    me: String,
    /// `[data-live="true"]` is present.
    live: bool,
    url: String,
    /// A window property set once by the test: gone after a reload.
    marker: Option<String>,
    /// The header's line about the coordinator serving the page.
    coord: String,
}

const HEADER_JS: &str = r#"
  const me = document.getElementById('me');
  return { role: me.dataset.role || '', me: me.textContent, live: document.querySelector('[data-live="true"]') !== null,
           url: location.href, marker: window.__fleetTestMarker || null, coord: document.getElementById('coord').textContent };
"#;

#[derive(Debug, Deserialize)]
struct Row {
    id: String,
    state: String,
}

const ROWS_JS: &str = r#"
  if (!document.getElementById('rows')) return null;
  return [...document.querySelectorAll('[data-deployment]')].map(r => ({ id: r.dataset.deployment, state: r.dataset.state }));
"#;

#[derive(Debug, Deserialize)]
struct Detail {
    id: String,
    state: String,
    steps: Vec<StepRow>,
    actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct StepRow {
    index: usize,
    state: String,
    name: String,
}

const DETAIL_JS: &str = r#"
  const root = document.querySelector('[data-detail]');
  if (!root) return null;
  return {
    id: root.dataset.detail, state: root.dataset.state,
    steps: [...root.querySelectorAll('[data-step]')].map(s => ({
      index: Number(s.dataset.step), state: s.dataset.state,
      name: s.querySelector('[data-field="name"]').firstChild.textContent })),
    actions: [...root.querySelectorAll('[data-action]')].map(b => b.dataset.action),
  };
"#;

#[derive(Debug, Deserialize)]
struct Width {
    scroll: u64,
    inner: u64,
}

const WIDTH_JS: &str = "return { scroll: document.documentElement.scrollWidth, inner: window.innerWidth };";

impl Browser {
    async fn header(&self) -> anyhow::Result<Header> {
        self.js(HEADER_JS).await
    }

    async fn rows(&self) -> anyhow::Result<Option<Vec<Row>>> {
        self.js(ROWS_JS).await
    }

    async fn detail(&self) -> anyhow::Result<Option<Detail>> {
        self.js(DETAIL_JS).await
    }

    /// Signed in as `role`, the event stream live, the deployment list shown.
    async fn wait_signed_in(&self, role: &str) -> anyhow::Result<Header> {
        eventually(&format!("the dashboard signed in as {role}, live"), PAGE_WAIT, || async {
            let h = self.header().await?;
            let listed = self.rows().await?.is_some();
            Ok((h.role == role && h.live && listed).then_some(h))
        })
        .await
    }

    /// The detail view of `id` once `done` holds for it.
    async fn wait_detail(&self, what: &str, id: &str, done: impl Fn(&Detail) -> bool) -> anyhow::Result<Detail> {
        eventually(what, PAGE_WAIT, || async {
            match self.detail().await? {
                Some(d) if d.id == id && done(&d) => Ok(Some(d)),
                other => bail!("the detail view shows {other:?}"),
            }
        })
        .await
    }
}

fn all_succeeded(d: &Detail) -> bool {
    d.state == "succeeded" && !d.steps.is_empty() && d.steps.iter().all(|s| s.state == "succeeded")
}

// ---------------------------------------------------------------- helpers

/// What `fleetctl tokens create NAME --role ROLE -o json` prints.
#[derive(Debug, Deserialize)]
struct TokenCreated {
    name: String,
    role: String,
    token: String,
}

async fn token(c: &Cluster, name: &str, role: &str) -> anyhow::Result<String> {
    let run = c.ctl(&["tokens", "create", name, "--role", role, "-o", "json"]).await?;
    run.expect_code(0)?;
    let t: TokenCreated = run.json()?;
    ensure!(t.name == name && t.role == role, "asked for {name} as {role}, got {t:?}");
    ensure!(t.token.starts_with("fleet_"), "a token that does not look like one: {t:?}");
    Ok(t.token)
}

/// Where screenshots go: `$CARGO_TARGET_DIR/artifacts`, else the
/// workspace's `target/artifacts`.
fn artifacts_dir() -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One HTTPS request without any credentials (no client certificate, no
/// token), trusting the cluster CA: what a browser's first request is.
/// Returns (status, lower-cased head, body).
async fn anonymous_get(c: &Cluster, addr: &str, path: &str) -> anyhow::Result<(u16, String, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(c.path().join("certs").join("ca.pem"))? {
        roots.add(ca?)?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).to_string();
        let mut s = tls.connect(ServerName::try_from(host)?, tcp).await.context("TLS handshake without a client certificate")?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        // A server may end TLS without close_notify after `Connection: close`.
        if let Err(e) = s.read_to_end(&mut buf).await {
            ensure!(e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty(), "reading the answer: {e}");
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("no HTTP answer: {text:?}"))?;
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("no status in {head:?}"))?;
        anyhow::Ok((status, head.to_ascii_lowercase(), body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(20), fut).await.with_context(|| format!("GET {path}: no answer in 20 s"))?
}

// ------------------------------------------------------------------ the test

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_headless_chromium() {
    let f = Fleet::start(&[("node-1", &[("env", "staging")]), ("node-2", &[("env", "staging")])], STAGING)
        .await
        .expect("a cluster with two nodes");
    let r = dashboard(&f).await;
    f.finish(r);
}

async fn dashboard(f: &Fleet) -> anyhow::Result<()> {
    let c = &f.cluster;
    // A follower serves the page: its API forwards what the leader must answer.
    let leader = c.leader_id().await?;
    let id_of_page = c.coords.keys().copied().find(|id| *id != leader).context("a follower")?;
    let addr = c.http_addr(id_of_page)?;
    let base = format!("https://{addr}/");

    // The page itself needs no credentials and holds no data; the API does.
    let (status, head, body) = anonymous_get(c, &addr, "/").await?;
    ensure!(status == 200, "GET / answered {status}: {head}");
    ensure!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    ensure!(head.contains("cache-control: no-store"), "{head}");
    let csp = head.lines().find_map(|l| l.strip_prefix("content-security-policy:")).context("no content-security-policy")?;
    ensure!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    ensure!(body.contains("<script nonce=") && !body.contains("__CSP_NONCE__"), "the page's script has no nonce");
    let (status, _, body) = anonymous_get(c, &addr, "/api/whoami").await?;
    ensure!(status == 401 && body.contains("unauthenticated"), "GET /api/whoami without credentials answered {status}: {body}");

    let operator = token(c, "dash-operator", "operator").await?;
    let viewer = token(c, "dash-viewer", "viewer").await?;

    // Hold the destination, so the deployment is seen queued before it runs.
    c.ctl(&["lock", "acquire", "staging", "-m", "dashboard test: hold the deployment", "-o", "json"]).await?.expect_code(0)?;

    let browser = Browser::start(&c.path().join("browser")).await?;
    let r = in_browser(f, &browser, &base, id_of_page, &operator, &viewer).await;
    if r.is_err() {
        let shot = artifacts_dir()?.join("dashboard-failed.png");
        let _ = browser.screenshot(&shot).await;
    }
    r?;
    browser.close().await
}

async fn in_browser(f: &Fleet, b: &Browser, base: &str, id_of_page: u64, operator: &str, viewer: &str) -> anyhow::Result<()> {
    let c = &f.cluster;
    let artifacts = artifacts_dir()?;

    // ---- the operator signs in through the URL fragment
    b.goto(&format!("{base}#token={operator}")).await?;
    let h = b.wait_signed_in("operator").await?;
    ensure!(h.me.contains("dash-operator"), "the header names {:?}", h.me);
    ensure!(!h.url.contains(operator), "the token stays in the address bar: {}", h.url);
    b.js::<bool>("window.__fleetTestMarker = 'the same page'; return true;").await?;
    // The header names the coordinator serving the page (a follower), not the leader that answers for the cluster.
    let serving = format!("coordinator {id_of_page} · leader {}", c.leader_id().await?);
    eventually(&format!("the header to say `{serving}`"), PAGE_WAIT, || async {
        Ok(b.header().await?.coord.contains(&serving).then_some(()))
    })
    .await?;

    // ---- a deployment submitted with fleetctl appears in the list
    let m = c.write_file("fleet.yaml", &format!("app: web\ndestination: staging\nrun: [\"fleet-demo-app\"]\nhealth: {HEALTH}\n"))?;
    let sub = c.deploy(&m, &["--release", "v1", "--detach"]).await?;
    sub.expect_code(0)?;
    let id = sub.id()?;
    eventually(&format!("{id} to appear in the list"), PAGE_WAIT, || async {
        let rows = b.rows().await?.unwrap_or_default();
        Ok(rows.iter().any(|r| r.id == id && r.state == "queued").then_some(()))
    })
    .await?;

    // ---- its detail view: queued behind the lock, then live to the end
    b.click(&format!("[data-deployment=\"{id}\"]")).await?;
    let queued = b.wait_detail(&format!("{id}'s detail view, queued"), &id, |d| d.state == "queued").await?;
    ensure!(queued.actions == ["cancel"], "an operator may cancel a queued deployment, and only that: {queued:?}");

    c.ctl(&["lock", "release", "staging", "-o", "json"]).await?.expect_code(0)?;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    let (seen, id) = (&seen, id.as_str());
    let done = eventually(&format!("{id} and every step succeeded on the page"), Duration::from_secs(90), || async move {
        let d = b.detail().await?.context("the detail view went away")?;
        ensure!(d.id == id, "the page shows {} instead", d.id);
        seen.lock().expect("not poisoned").insert(d.state.clone());
        ensure!(d.state != "failed" && d.state != "cancelled", "{id} ended {} on the page", d.state);
        Ok(all_succeeded(&d).then_some(d))
    })
    .await?;
    let seen = seen.lock().expect("not poisoned").clone();
    ensure!(seen.contains("running"), "the page never showed {id} running (it saw {seen:?}): not live");

    // The page's steps are the deployment's steps, as fleetctl reads them.
    let d = c.deployment(id).await?;
    ensure!(d.state == DeployState::Succeeded, "fleetctl status says {}", d.state);
    let on_page: Vec<(usize, &str)> = done.steps.iter().map(|s| (s.index, s.name.as_str())).collect();
    let recorded: Vec<(usize, &str)> = d.steps.iter().enumerate().map(|(i, s)| (i, s.plan.name.as_str())).collect();
    ensure!(on_page == recorded, "steps on the page {on_page:?}, recorded {recorded:?}");
    ensure!(done.actions == ["rollback"], "an operator may roll back a succeeded deployment, and only that: {done:?}");

    let h = b.header().await?;
    ensure!(h.live, "the live indicator is off");
    ensure!(h.marker.as_deref() == Some("the same page"), "the page was reloaded");
    let desktop = artifacts.join("dashboard.png");
    b.screenshot(&desktop).await?;

    // ---- the list row was updated in place while the detail was shown
    b.click("#tabs a[data-tab=\"deployments\"]").await?;
    eventually(&format!("{id}'s row succeeded"), PAGE_WAIT, || async {
        let rows = b.rows().await?.unwrap_or_default();
        Ok(rows.iter().any(|r| r.id == id && r.state == "succeeded").then_some(()))
    })
    .await?;

    // ---- a phone's width: no horizontal scrolling in any view
    b.client().set_window_size(390, 844).await.context("resizing the window")?;
    let views: [(&str, &str); 4] = [
        ("#/destinations", "[data-destination=\"staging\"]"),
        ("#/cluster", "#members tbody tr"),
        ("#/deployments", "[data-deployment]"),
        ("", "[data-step]"),
    ];
    for (hash, ready) in views {
        if hash.is_empty() {
            b.click(&format!("[data-deployment=\"{id}\"]")).await?;
        } else {
            b.js::<bool>(&format!("location.hash = '{hash}'; return true;")).await?;
        }
        let w: Width = eventually(&format!("the view {hash:?} at 390 px"), PAGE_WAIT, || async {
            let shown: bool = b.js(&format!("return document.querySelector('{ready}') !== null;")).await?;
            if !shown {
                return Ok(None);
            }
            Ok(Some(b.js::<Width>(WIDTH_JS).await?))
        })
        .await?;
        ensure!(w.inner <= 390, "the window is {} px wide, not a phone's 390", w.inner);
        ensure!(w.scroll <= 390, "the view {hash:?} scrolls sideways at 390 px: {} px wide", w.scroll);
    }
    b.wait_detail("the detail view at phone width", id, all_succeeded).await?;
    b.screenshot(&artifacts.join("dashboard-phone.png")).await?;
    ensure!(b.header().await?.marker.as_deref() == Some("the same page"), "the page was reloaded");
    b.client().set_window_size(1280, 900).await.context("resizing the window")?;

    // ---- a viewer sees the same deployment, without any action
    b.goto("about:blank").await?;
    b.goto(&format!("{base}#token={viewer}")).await?;
    let h = b.wait_signed_in("viewer").await?;
    ensure!(h.me.contains("dash-viewer"), "the header names {:?}", h.me);
    b.click(&format!("[data-deployment=\"{id}\"]")).await?;
    let as_viewer = b.wait_detail(&format!("{id} as the viewer sees it"), id, all_succeeded).await?;
    ensure!(as_viewer.actions.is_empty(), "a viewer is offered {:?}", as_viewer.actions);
    let buttons: usize = b
        .js("return document.querySelectorAll('[data-action=\"cancel\"], [data-action=\"rollback\"], [data-action=\"promote\"]').length;")
        .await?;
    ensure!(buttons == 0, "{buttons} action buttons on a viewer's page");
    Ok(())
}
