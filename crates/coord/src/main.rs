use clap::Parser;
use fleet_coord::config::RawConfig;

/// mimalloc instead of glibc's malloc: at 64 clients a replicated write spent
/// 14 % of the machine in malloc/free; with this allocator (and one write per
/// changed state key) replicated writes measured +9-12 % at 8-256 clients
/// and steps/s +15 % at 100 destinations (docs/benchmarks.md). Only the
/// coordinator binary: the library and its tests keep the system allocator,
/// and so does a build with the `system-allocator` feature (for heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error (nothing was touched).
const EXIT_CONFIG: i32 = 2;

fn main() {
    let raw = RawConfig::parse().merge_file();
    // A bad format is reported by validate() below; log as text until then.
    let json = raw.as_ref().ok().and_then(|r| r.log_format.as_deref()) == Some("json");
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    if json {
        // One JSON object per line; span fields (deployment, step, token) included.
        tracing_subscriber::fmt().json().with_current_span(true).with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let config = match raw.and_then(|r| r.validate()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-coord: configuration error: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        tracing::debug!("a TLS crypto provider was already installed");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet-coord: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(fleet_coord::server::run(config, shutdown_signal())) {
        eprintln!("fleet-coord: {e:#}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
