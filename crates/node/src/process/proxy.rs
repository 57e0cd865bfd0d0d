//! An app's route: a TCP listener on the app's stable port that forwards
//! each accepted connection to the current backend instance. It listens on
//! 127.0.0.1 unless the manifest says otherwise (`route: { listen: ADDR }`,
//! e.g. `0.0.0.0` to serve other hosts); backends are always reached on
//! 127.0.0.1.
//!
//! Switching the backend affects only new connections; connections already
//! open stay with the instance they started on, and are counted per backend
//! port so that stopping an old instance can wait for them to drain. The
//! listener stays open across switches, so clients never see a refused
//! connection during a deployment.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Open proxied connections to one backend port.
#[derive(Debug, Default)]
pub struct ConnCount {
    open: AtomicUsize,
    changed: Notify,
}

impl ConnCount {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Wait until no connection is open, at most `limit`. Returns how many
    /// are still open (0 = drained).
    pub async fn drained(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            let n = self.open();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.open();
            }
        }
    }
}

/// Decrements the count when the proxied connection ends.
struct Held(Arc<ConnCount>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Connection counts of every backend port on this node.
#[derive(Debug, Default, Clone)]
pub struct Conns(Arc<Mutex<HashMap<u16, Arc<ConnCount>>>>);

impl Conns {
    pub fn of(&self, port: u16) -> Arc<ConnCount> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|p, c| *p == port || c.open() > 0 || Arc::strong_count(c) > 1);
        m.entry(port).or_default().clone()
    }
}

struct Shared {
    app: String,
    backend: Mutex<Option<u16>>,
    conns: Conns,
}

impl Shared {
    /// The current backend, already counted (under the same lock as a
    /// switch, so a drain that starts after the switch sees every
    /// connection that chose the old backend).
    fn pick(&self) -> Option<(u16, Held)> {
        let b = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let port = (*b)?;
        let count = self.conns.of(port);
        count.open.fetch_add(1, Ordering::SeqCst);
        Some((port, Held(count)))
    }
}

/// A listening route. Dropping it stops accepting (open connections go on).
pub struct Route {
    addr: SocketAddr,
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Route {
    /// Listen on `listen`:`port` (`listen` None = 127.0.0.1; port 0 = any
    /// free port). Must be called within a tokio runtime.
    pub fn bind(app: &str, listen: Option<&str>, port: u16, conns: Conns) -> std::io::Result<Route> {
        let ip = listen_ip(listen)?;
        let std_listener = std::net::TcpListener::bind(SocketAddr::from((ip, port)))?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { app: app.to_string(), backend: Mutex::new(None), conns });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Route { addr, port: addr.port(), shared, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where it listens (the address given to `bind`, with its port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Does it listen on `listen` (None = 127.0.0.1)?
    pub fn listens_on(&self, listen: Option<&str>) -> bool {
        listen_ip(listen).is_ok_and(|ip| ip == self.addr.ip())
    }

    /// Point new connections at `backend` (an instance's port), or refuse
    /// them (`None`).
    pub fn set_backend(&self, backend: Option<u16>) {
        *self.shared.backend.lock().unwrap_or_else(|p| p.into_inner()) = backend;
    }

    pub fn backend(&self) -> Option<u16> {
        *self.shared.backend.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop listening and wait until the port is released.
    pub async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The route's listen address: `listen` (an IP address), or 127.0.0.1.
pub fn listen_ip(listen: Option<&str>) -> std::io::Result<IpAddr> {
    match listen {
        None => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some(s) => s.trim().parse().map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{s}` is not an IP address (the manifest's `route.listen`)"))
        }),
    }
}

/// `ip:port` as clients would write it (`[::]:80` for IPv6).
pub fn route_text(listen: Option<&str>, port: u16) -> String {
    SocketAddr::from((listen_ip(listen).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), port)).to_string()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((sock, _peer)) => {
                tokio::spawn(forward(sock, shared.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(app = %shared.app, error = %e, "route accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a new connection may wait for a backend that refuses (an
/// instance being restarted by supervision).
const CONNECT_PATIENCE: Duration = Duration::from_secs(3);

async fn forward(mut client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    let mut wait = Duration::from_millis(20);
    loop {
        let Some((port, held)) = shared.pick() else {
            tracing::debug!(app = %shared.app, "route has no backend; closing the connection");
            return;
        };
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            Ok(mut upstream) => {
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                drop(held);
                return;
            }
            Err(e) => {
                drop(held);
                if tokio::time::Instant::now() + wait > deadline {
                    tracing::warn!(app = %shared.app, port, error = %e, "backend refused the connection; giving up on this client");
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_read_and_print_like_clients_write_them() {
        // (route.listen, port, what the step output says)
        let cases = [
            (None, 80, "127.0.0.1:80"),
            (Some("0.0.0.0"), 8080, "0.0.0.0:8080"),
            (Some("::"), 80, "[::]:80"),
            (Some(" ::1 "), 1, "[::1]:1"),
        ];
        for (listen, port, want) in cases {
            assert_eq!(route_text(listen, port), want, "{listen:?}");
        }
        assert!(listen_ip(Some("localhost")).is_err(), "a name is not an address");
    }

    #[tokio::test]
    async fn a_route_listens_where_it_is_told_and_knows_it() {
        let conns = Conns::default();
        let lo = Route::bind("web", None, 0, conns.clone()).expect("loopback");
        assert!(lo.listens_on(None) && lo.listens_on(Some("127.0.0.1")) && !lo.listens_on(Some("0.0.0.0")));
        assert_eq!(lo.addr().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let any = Route::bind("web", Some("0.0.0.0"), 0, conns).expect("every interface");
        assert!(any.listens_on(Some("0.0.0.0")) && !any.listens_on(None));
        // 0.0.0.0 takes connections on any local address, 127.0.0.1 only on itself.
        assert!(TcpStream::connect((Ipv4Addr::new(127, 0, 0, 2), any.port())).await.is_ok());
        assert!(TcpStream::connect((Ipv4Addr::new(127, 0, 0, 2), lo.port())).await.is_err());
        lo.close().await;
        any.close().await;
    }
}
