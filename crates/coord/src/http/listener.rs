//! The HTTPS listener: rustls with this coordinator's certificate; client
//! certificates are verified against the cluster CA when presented but not
//! required (browsers use bearer tokens, see `auth`). HTTP/1.1 by hyper;
//! requests are handed to the axum router with the connection's [`Peer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use fleet_core::Via;

use crate::tls::{identity_of_der, KnownCaller, TlsMaterial};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("the TLS material cannot serve HTTPS: {0}; check that the key belongs to the certificate and both are PEM")]
    Tls(String),
}

/// Who is on the other end of a connection: its address and what its
/// certificate says (or why it says nothing usable).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub caller: Result<KnownCaller, String>,
}

/// rustls server settings from the same material the gRPC listener uses.
pub fn server_config(tls: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, ListenerError> {
    let bad = |e: &dyn std::fmt::Display| ListenerError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        roots.add(ca.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    // A certificate is verified when presented, but not required: browsers
    // and scripts authenticate with a bearer token instead (`auth`), and a
    // request with neither is answered 401.
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated().build().map_err(|e| bad(&e))?;
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| bad(&e))?;
    let mut config =
        rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs, key).map_err(|e| bad(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accept connections until the task is dropped (the server aborts it at
/// shutdown); each connection is served on its own task, which ends with
/// its connection.
pub async fn serve(listener: TcpListener, config: Arc<rustls::ServerConfig>, router: Router) {
    let acceptor = TlsAcceptor::from(config);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, then go on.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, router) = (acceptor.clone(), router.clone());
        // Detached: a connection lives as long as its client keeps it open.
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "HTTPS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "HTTPS handshake timed out");
                    return;
                }
            };
            let caller = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(der) => identity_of_der(der.as_ref())
                    .map(|(name, role)| KnownCaller { name, role, via: Via::Certificate, from: addr.to_string() })
                    .map_err(|s| s.message().to_string()),
                None => Err("no client certificate; connect with mTLS (a certificate from `fleetctl certs issue`)".to_string()),
            };
            let peer = Peer { addr, caller };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                let mut router = router.clone();
                async move { tower_service::Service::call(&mut router, req).await }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%addr, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}
