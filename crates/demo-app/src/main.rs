//! `fleet-demo-app`: a small HTTP server that says which release it is.
//!
//! Fleet's `process` adapter starts it with `PORT`, `FLEET_APP` and
//! `FLEET_RELEASE` in its environment, probes `/healthz`, and routes traffic
//! to it. `DEMO_FAIL_HEALTH=1` makes the health check fail, to demonstrate
//! (and test) an automatic rollback.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Parser;

/// A small HTTP server that reports its release (Fleet's demo app).
///
/// Endpoints:
///   GET /         `fleet demo app, release <R>` (text)
///   GET /release  `{"app": ..., "release": ..., "pid": ...}` (JSON)
///   GET /healthz  200 `ok`, or 503 with --fail-health / DEMO_FAIL_HEALTH=1
///
/// It listens on 127.0.0.1 only. On SIGTERM or Ctrl-C it stops accepting
/// connections, finishes the requests in flight, and exits 0.
#[derive(Parser, Debug)]
#[command(name = "fleet-demo-app", version, verbatim_doc_comment)]
struct Args {
    /// TCP port to listen on (127.0.0.1). Fleet sets PORT for each instance.
    #[arg(long, env = "PORT", value_name = "PORT")]
    port: u16,
    /// Release name to report. Fleet sets FLEET_RELEASE.
    #[arg(long, env = "FLEET_RELEASE", default_value = "dev", value_name = "NAME")]
    release: String,
    /// App name to report. Fleet sets FLEET_APP.
    #[arg(long, env = "FLEET_APP", default_value = "demo", value_name = "NAME")]
    app: String,
    /// Answer /healthz with 503 (a release that never becomes healthy).
    /// DEMO_FAIL_HEALTH accepts 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "DEMO_FAIL_HEALTH", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    fail_health: bool,
}

struct Info {
    app: String,
    release: String,
    fail_health: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let info = Arc::new(Info { app: args.app, release: args.release, fail_health: args.fail_health });
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fleet-demo-app: cannot listen on {addr}: {e}; choose another --port (or PORT)");
            return ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().unwrap_or(addr);
    println!("fleet-demo-app {}@{} (pid {}) listening on http://{addr}", info.app, info.release, std::process::id());
    let app = Router::new().route("/", get(root)).route("/release", get(release)).route("/healthz", get(healthz)).with_state(info);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await {
        eprintln!("fleet-demo-app: server error: {e}");
        return ExitCode::from(1);
    }
    println!("fleet-demo-app: stopped (pid {})", std::process::id());
    ExitCode::SUCCESS
}

async fn root(State(info): State<Arc<Info>>) -> impl IntoResponse {
    format!("fleet demo app, release {}\n", info.release)
}

async fn release(State(info): State<Arc<Info>>) -> impl IntoResponse {
    let body = serde_json::json!({"app": info.app, "release": info.release, "pid": std::process::id()});
    ([(header::CONTENT_TYPE, "application/json")], format!("{body}\n"))
}

async fn healthz(State(info): State<Arc<Info>>) -> impl IntoResponse {
    if info.fail_health {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy (DEMO_FAIL_HEALTH is set)\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// SIGTERM (how Fleet stops an instance) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("fleet-demo-app: shutting down; finishing requests in flight");
}
