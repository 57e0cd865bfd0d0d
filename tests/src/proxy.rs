//! Slow links: a TCP proxy on 127.0.0.1 that holds every chunk it forwards
//! for a delay that can be changed while it runs (`tc netem` is not
//! available on these kernels). Each direction keeps its byte order; a
//! chunk goes out `delay` after it was read, so the delay is latency, not a
//! bandwidth limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A proxy to one target address. Dropping it stops accepting and closes
/// every connection it carries.
pub struct DelayProxy {
    /// Where clients connect (HOST:PORT).
    pub addr: String,
    delay_ms: Arc<AtomicU64>,
    accept: JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl DelayProxy {
    /// Listen on 127.0.0.1 (an OS-assigned port) and forward to `target`.
    pub async fn start(target: &str) -> anyhow::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
        let addr = listener.local_addr()?.to_string();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let target = target.to_string();
        let delay = delay_ms.clone();
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let tracked = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(&target).await else { continue };
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let mut list = tracked.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|c| !c.is_finished());
                list.push(tokio::spawn(forward(ri, wo, delay.clone())).abort_handle());
                list.push(tokio::spawn(forward(ro, wi, delay.clone())).abort_handle());
            }
        });
        Ok(DelayProxy { addr, delay_ms, accept, conns })
    }

    /// Every byte read from now on is held this long before it is sent on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            c.abort();
        }
    }
}

/// Copy `from` to `to`, each chunk sent `delay` after it was read.
async fn forward(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Arc<AtomicU64>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await; // the injected latency
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
