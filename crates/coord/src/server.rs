//! Wiring: storage → Raft → gRPC services on one mTLS listener.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use fleet_core::auth::Role;
use fleet_proto::control_server::ControlServer;
use fleet_proto::raft_server::RaftServer;
use fleet_proto::worker_server::WorkerServer;
use openraft::{BasicNode, SnapshotPolicy};

use crate::config::Config;
use crate::control::ControlService;
use crate::network::{Network, MAX_MESSAGE_BYTES};
use crate::raft_service::RaftService;
use crate::raft_types::Raft;
use crate::store::{self, log::LogStore, sm::StateMachine};
use crate::tls::TlsMaterial;

/// How long open streams get to end after a storage failure stopped Raft.
const STORAGE_FAILURE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Snapshot chunk size: well under the gRPC message limit.
const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let tls = TlsMaterial::load(&config.ca, &config.cert, &config.key, Some(Role::Coordinator))?;
    let cluster_id = tls.cluster_id();
    let db = store::open(&config.data_dir, &cluster_id, config.id)?;
    crate::faults::watch(&config.data_dir).context("starting the failpoint watcher")?;
    let log_store = LogStore::new(db.clone());
    let (state_machine, reader) = StateMachine::open(db).context("loading the state machine from the data dir")?;

    let election_ms = config.election_timeout.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: format!("fleet-{cluster_id}"),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        election_timeout_min: election_ms,
        // Also openraft's leader lease: a follower that knew a leader stands
        // only after lease + its own timeout (see `RawConfig::election_timeout_ms`).
        election_timeout_max: election_ms * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        // Keep some log behind a snapshot so a briefly lagging follower is
        // caught up by entries, not by a whole snapshot.
        max_in_snapshot_log_to_keep: config.snapshot_logs.min(1000),
        // openraft bounds each AppendEntries by the heartbeat interval, and
        // a batched entry carries up to `propose::MAX_BATCH` requests: keep
        // a catch-up payload small enough to be sent, decoded and fsynced
        // within one heartbeat on a busy machine (a lagging follower that
        // times out on every payload never catches up).
        max_payload_entries: 32,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    let raft_config = Arc::new(raft_config.validate().context("invalid Raft timing settings")?);
    let raft =
        openraft::Raft::new(config.id, raft_config, Network::new(tls.clone()), log_store, state_machine).await.context("starting Raft")?;
    let raft = crate::propose::start(raft);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}; pick another --listen address", config.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let advertise = config.advertise.clone().unwrap_or_else(|| bound.to_string());

    if config.bootstrap {
        bootstrap(&raft, config.id, &advertise).await?;
    }

    let hub = Arc::new(crate::hub::Hub::default());
    let scheduler = crate::scheduler::spawn(raft.clone(), reader.clone(), hub.clone());
    let sync = crate::sync::spawn(raft.clone(), reader.clone(), hub.clone(), config.sync_interval);
    let control = Arc::new(ControlService::new(raft.clone(), reader.clone(), cluster_id.clone(), hub.clone()));
    crate::metrics::watch_leader(&raft);
    let http = match config.http_addr {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the HTTP API; pick another --http-addr"))?;
            let bound = listener.local_addr().context("reading the bound HTTP address")?;
            let api = crate::http::HttpApi::new(control.clone(), tls.clone(), raft.clone(), reader.clone(), hub.clone());
            let task = crate::http::spawn(listener, &tls, api)?;
            if let Some(path) = &config.http_addr_file {
                write_atomically(path, &bound.to_string())?;
            }
            tracing::info!(%bound, "HTTP API listening (HTTPS, client certificates required)");
            Some(task)
        }
    };
    // A coordinator whose storage failed (a write or fsync of the log, the
    // state machine) must not go on answering: Raft has stopped, and
    // clients and nodes should turn to the others.
    let storage_failed = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let gave_up = std::sync::Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let failed = storage_failed.clone();
        let gave_up = gave_up.clone();
        // Raft's core stops on a storage error: its server metrics
        // channel closes then (they change only with role and leader, so
        // waiting on them costs nothing per write), and its last metrics
        // say why.
        let mut server_metrics = raft.server_metrics();
        let raft = raft.clone();
        async move {
            let fatal = async {
                loop {
                    if let Some(why) = stopped_on_error(&raft) {
                        return why;
                    }
                    if server_metrics.changed().await.is_err() {
                        if let Some(why) = stopped_on_error(&raft) {
                            return why;
                        }
                        // Raft was shut down by us: not a failure.
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                _ = shutdown => {}
                why = fatal => {
                    tracing::error!(error = %why, "Raft stopped on a storage error; this coordinator stops serving");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    gave_up.notify_one();
                }
            }
        }
    };
    let worker = crate::worker::WorkerService::new(raft.clone(), reader, hub);
    let contact = Arc::new(crate::leader_watch::Contact::default());
    // openraft's leader lease is the maximum election timeout.
    let leader_watch = crate::leader_watch::spawn(
        raft.clone(),
        config.id,
        tls.clone(),
        contact.clone(),
        std::time::Duration::from_millis(election_ms * 2),
    );
    let server = tonic::transport::Server::builder()
        .tls_config(tls.server_config())
        .context("TLS settings")?
        .add_service(
            RaftServer::new(RaftService::new(raft.clone(), contact))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(crate::metrics::Timed(ControlServer::from_arc(control)))
        .add_service(WorkerServer::new(worker))
        // The builder's own `tcp_nodelay` applies only to listeners it
        // binds itself: set it on this listener's connections. With Nagle
        // on, a reply written as more than one segment (a deployment, a
        // status) waited for the client's delayed ACK: 40 ms per call.
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown);

    if let Some(path) = &config.addr_file {
        write_atomically(path, &bound.to_string())?;
    }
    tracing::info!(id = config.id, %bound, %advertise, cluster = %cluster_id, "coordinator listening");
    if config.log_format == crate::config::LogFormat::Text {
        // With --log-format json every line of output is a JSON log line;
        // the log line above says the same.
        println!("fleet-coord {} listening on {bound} (cluster {cluster_id})", config.id);
    }

    // A graceful stop waits for open streams (nodes' work streams, watches)
    // to end; after a storage failure they get a few seconds, no more.
    let served = tokio::select! {
        served = server => served,
        _ = async {
            gave_up.notified().await;
            tokio::time::sleep(STORAGE_FAILURE_GRACE).await;
        } => Ok(()),
    };
    scheduler.abort();
    sync.abort();
    leader_watch.abort();
    if let Some(http) = http {
        http.abort();
    }
    // Stop Raft whether serving ended cleanly or not.
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    served.context("serving gRPC")?;
    if let Some(why) = storage_failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        anyhow::bail!(
            "Raft stopped: {why}. This coordinator stopped serving rather than acknowledge what it could not store; \
             check the disk under {} (free space, I/O errors in the kernel log), then start it again: it catches up from the others",
            config.data_dir.display()
        );
    }
    Ok(())
}

/// Why Raft stopped, when it stopped on an error (not at our request):
/// its last metrics say.
fn stopped_on_error(raft: &Raft) -> Option<String> {
    match &raft.metrics().borrow().running_state {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(fatal) => Some(fatal.to_string()),
    }
}

async fn bootstrap(raft: &Raft, id: u64, advertise: &str) -> anyhow::Result<()> {
    if raft.is_initialized().await.context("reading Raft state")? {
        tracing::info!("already part of a cluster; --bootstrap has nothing to do");
        return Ok(());
    }
    let members = BTreeMap::from([(id, BasicNode::new(advertise))]);
    raft.initialize(members).await.context("bootstrapping a single-voter cluster")?;
    tracing::info!(id, "bootstrapped a new cluster with this coordinator as its only voter");
    Ok(())
}

fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
