//! A real cluster of `fleet-coord` processes on 127.0.0.1 with OS-assigned
//! ports, driven through the same client code `fleetctl` uses. Waits poll
//! a condition with a deadline; nothing sleeps a fixed time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fleet_proto::*;
use fleetctl::client::{Client, Context};
use fleetctl::dev::{self, CoordSpec};

/// Start-up and election settings for tests: fast, but with headroom for a
/// loaded 2-core CI machine.
pub const FAST_RAFT: &[&str] = &["--heartbeat-ms", "50", "--election-timeout-ms", "300"];

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct Coord {
    pub spec: CoordSpec,
    pub child: Option<Child>,
    pub addr: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub ctl: PathBuf,
    pub coords: BTreeMap<u64, Coord>,
    pub extra_args: Vec<String>,
}

impl Cluster {
    /// Certificates plus `n` coordinators joined as voters.
    pub async fn start(n: u64, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        install_crypto();
        // FLEET_KEEP_TEST_DIR=1 keeps logs and data of a failed run for a post-mortem.
        let keep = std::env::var_os("FLEET_KEEP_TEST_DIR").is_some();
        let dir = tempfile::Builder::new().prefix("fleet-test-").disable_cleanup(keep).tempdir()?;
        fleetctl::certs::init(&dir.path().join("certs"), false)?;
        let mut cluster = Cluster {
            bin: dev::find_binary("fleet-coord")?,
            ctl: dev::find_binary("fleetctl")?,
            dir,
            coords: BTreeMap::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        cluster.spawn(1, true, "127.0.0.1:0")?;
        let mut c = cluster.client("operator")?;
        for id in 2..=n {
            cluster.spawn(id, false, "127.0.0.1:0")?;
            let addr = cluster.coords[&id].addr.clone();
            c.call_with_timeout(Duration::from_secs(120), |mut cl, _| {
                let req = AddLearnerRequest { id, addr: addr.clone() };
                async move { cl.add_learner(req).await.map(|r| r.into_inner()) }
            })
            .await?;
            c.call(|mut cl, _| async move { cl.promote(PromoteRequest { id }).await.map(|r| r.into_inner()) }).await?;
        }
        Ok(cluster)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start coordinator `id` (again) listening on `listen`.
    pub fn spawn(&mut self, id: u64, bootstrap: bool, listen: &str) -> anyhow::Result<()> {
        let spec = CoordSpec {
            id,
            dir: self.dir.path().to_path_buf(),
            bootstrap,
            listen: listen.to_string(),
            extra_args: self.extra_args.clone(),
        };
        let (child, addr) = dev::spawn_coordinator(&self.bin, &spec, Duration::from_secs(30))?;
        self.coords.insert(id, Coord { spec, child: Some(child), addr });
        Ok(())
    }

    /// Every coordinator address, in id order.
    pub fn addrs(&self) -> Vec<String> {
        self.coords.values().map(|c| c.addr.clone()).collect()
    }

    pub fn context(&self, cert: &str) -> Context {
        let certs = self.dir.path().join("certs");
        Context {
            addrs: self.addrs(),
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("{cert}.pem")),
            key: certs.join(format!("{cert}-key.pem")),
        }
    }

    pub fn client(&self, cert: &str) -> anyhow::Result<Client> {
        let mut c = Client::new(&self.context(cert))?;
        c.retry_for = Duration::from_secs(30);
        Ok(c)
    }

    /// Run the real `fleetctl` binary with this cluster's context.
    pub fn fleetctl(&self, cert: &str, args: &[&str]) -> anyhow::Result<Output> {
        let ctx_path = self.dir.path().join(format!("context-{cert}.json"));
        self.context(cert).save(&ctx_path)?;
        Command::new(&self.ctl)
            .args(args)
            .env("FLEET_CONTEXT", &ctx_path)
            .env_remove("FLEET_ADDR")
            .env_remove("FLEET_CA")
            .env_remove("FLEET_CERT")
            .env_remove("FLEET_KEY")
            .output()
            .context("running fleetctl")
    }

    /// `kill -9` one coordinator.
    pub fn kill9(&mut self, id: u64) -> anyhow::Result<()> {
        let coord = self.coords.get_mut(&id).context("no such coordinator")?;
        if let Some(mut child) = coord.child.take() {
            child.kill()?; // SIGKILL
            child.wait()?;
        }
        Ok(())
    }

    /// Restart a killed coordinator on the address the others know.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let addr = self.coords[&id].addr.clone();
        self.spawn(id, false, &addr)
    }

    /// Cluster status as answered by the leader (following redirects).
    pub async fn status(&self) -> anyhow::Result<ClusterStatusReply> {
        let mut c = self.client("operator")?;
        c.call(|mut cl, _| async move { cl.cluster_status(ClusterStatusRequest { local: false }).await.map(|r| r.into_inner()) })
            .await
    }

    /// One coordinator's own view.
    pub async fn local_status(&self, id: u64) -> anyhow::Result<ClusterStatusReply> {
        let mut ctx = self.context("operator");
        ctx.addrs = vec![self.coords[&id].addr.clone()];
        let mut c = Client::new(&ctx)?;
        c.retry_for = Duration::from_secs(5);
        c.call(|mut cl, _| async move { cl.cluster_status(ClusterStatusRequest { local: true }).await.map(|r| r.into_inner()) })
            .await
    }

    pub fn log_of(&self, id: u64) -> String {
        dev::tail_of(&self.coords[&id].spec.log_file(), 40)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.coords.values_mut() {
            if let Some(mut child) = c.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Poll `f` until it returns `Some`, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Acquire through a client with a given request id (so a test can retry
/// the exact same logical operation).
pub async fn acquire(c: &mut Client, dest: &str, reason: &str, request_id: &str) -> anyhow::Result<LockReply> {
    c.call(|mut cl, _| {
        let req = AcquireLockRequest { destination: dest.into(), reason: reason.into(), wait_ms: 0, request_id: request_id.into() };
        async move { cl.acquire_lock(req).await.map(|r| r.into_inner()) }
    })
    .await
}

pub async fn release(c: &mut Client, dest: &str, request_id: &str) -> anyhow::Result<LockReply> {
    c.call(|mut cl, _| {
        let req = ReleaseLockRequest { destination: dest.into(), request_id: request_id.into() };
        async move { cl.release_lock(req).await.map(|r| r.into_inner()) }
    })
    .await
}

pub async fn lock_status(c: &mut Client, dest: &str) -> anyhow::Result<LockStatusReply> {
    c.call(|mut cl, _| {
        let req = LockStatusRequest { destination: dest.into() };
        async move { cl.lock_status(req).await.map(|r| r.into_inner()) }
    })
    .await
}
