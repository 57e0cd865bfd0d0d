//! An HTTPS client of a coordinator's JSON API, presenting a client
//! certificate or a bearer token, and a reader of its server-sent events:
//! hyper over tokio-rustls with the certificates `fleetctl certs init`
//! wrote, the way any HTTPS client would call. Used by the API tests
//! (tests/http.rs) and by `fleet-bench api` (dashboards streaming while
//! writes are measured).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::harness::Cluster;
/// An HTTPS client of one coordinator, presenting one certificate.
#[derive(Clone)]
pub struct Https {
    pub addr: String,
    pub tls: tokio_rustls::TlsConnector,
    /// Sent as `Authorization: Bearer ...` when set.
    pub bearer: Option<String>,
}

pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub content_type: String,
    pub body: String,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("answer ({}) is not a {}: {}", self.status, std::any::type_name::<T>(), self.body))
    }

    pub fn expect(&self, status: u16) -> anyhow::Result<&Self> {
        ensure!(self.status == status, "expected HTTP {status}, got {}: {}", self.status, self.body);
        Ok(self)
    }

    /// The JSON error of a failed call, which must be `status` with `code`.
    pub fn error(&self, status: u16, code: &str) -> anyhow::Result<ApiError> {
        self.expect(status)?;
        let e: ApiError = self.json()?;
        ensure!(e.code == code, "expected error code {code}, got {e:?}");
        ensure!(!e.message.is_empty(), "an error without a message: {e:?}");
        Ok(e)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl Https {
    pub fn new(cluster: &Cluster, id: u64, cert: &str) -> anyhow::Result<Https> {
        let certs = cluster.path().join("certs");
        let read = |name: String| std::fs::read(certs.join(&name)).with_context(|| format!("reading {name}"));
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read("ca.pem".into())?) {
            roots.add(ca?)?;
        }
        let chain = CertificateDer::pem_slice_iter(&read(format!("{cert}.pem"))?).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&read(format!("{cert}-key.pem"))?)?;
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key)?;
        Ok(Https { addr: cluster.http_addr(id)?, tls: tokio_rustls::TlsConnector::from(Arc::new(config)), bearer: None })
    }

    /// A client without a certificate, sending `token` (if any) as a bearer
    /// token: what a browser or a script with an API token is.
    pub fn with_token(cluster: &Cluster, id: u64, token: Option<&str>) -> anyhow::Result<Https> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(cluster.path().join("certs").join("ca.pem"))? {
            roots.add(ca?)?;
        }
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        Ok(Https {
            addr: cluster.http_addr(id)?,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            bearer: token.map(str::to_string),
        })
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
        let host = self.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&self.addr).to_string();
        let stream = self.tls.connect(ServerName::try_from(host)?, tcp).await.context("TLS handshake")?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        // Ends with the connection.
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", &self.addr);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = &self.bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        Ok(sender.send_request(req).await?)
    }

    /// One request; a read is repeated while the answer is `503
    /// unavailable` (the API's "retry in a moment": no leader yet, or a
    /// leadership check that timed out on a loaded machine), as a
    /// well-behaved client does, for up to 15 s. Writes are sent once.
    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<Answer> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let a = self.call_once(method, path, body.clone()).await?;
            if a.status != 503 || method != "GET" || tokio::time::Instant::now() > deadline {
                return Ok(a);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn call_once(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<Answer> {
        let fut = async {
            let resp = self.send(method, path, body.map(|b| b.to_string()), &[]).await?;
            let status = resp.status().as_u16();
            let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
            let (location, content_type) = (header("location"), header("content-type").unwrap_or_default());
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok(Answer { status, location, content_type, body: String::from_utf8_lossy(&bytes).to_string() })
        };
        tokio::time::timeout(Duration::from_secs(30), fut).await.with_context(|| format!("{method} {path}: no answer in 30 s"))?
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.call("GET", path, None).await
    }

    pub async fn events(&self, last_event_id: Option<u64>) -> anyhow::Result<Events> {
        let headers: Vec<(&str, String)> = last_event_id.map(|n| ("last-event-id", n.to_string())).into_iter().collect();
        let resp = self.send("GET", "/api/events", None, &headers).await?;
        ensure!(resp.status() == 200, "GET /api/events answered {}", resp.status());
        Ok(Events { body: resp.into_body(), buf: String::new(), last_id: last_event_id })
    }
}

// ------------------------------------------------------ server-sent events

#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub event: String,
    pub data: String,
    /// The stream's last event id after this event (as a browser keeps it).
    pub last_id: Option<u64>,
    /// The id this event itself carried.
    pub id: Option<u64>,
}

pub struct Events {
    body: hyper::body::Incoming,
    buf: String,
    pub last_id: Option<u64>,
}

impl Events {
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Sse> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data, mut id) = (String::from("message"), Vec::new(), None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse::<u64>().with_context(|| format!("event id `{v}` is not a log index"))?);
                    }
                }
                if data.is_empty() && id.is_none() {
                    continue; // a keep-alive comment
                }
                if id.is_some() {
                    self.last_id = id;
                }
                return Ok(Sse { event, data: data.join("\n"), last_id: self.last_id, id });
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame()).await.context("no event in time")?;
            match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&d));
                    }
                }
                Some(Err(e)) => bail!("event stream broke: {e}"),
                None => bail!("event stream ended"),
            }
        }
    }

    /// Events until `done` holds for one of them (that one included).
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&Sse) -> bool) -> anyhow::Result<Vec<Sse>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = vec![];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = self.next(left).await.with_context(|| format!("after {} events: {:?}", out.len(), out.last()))?;
            let stop = done(&e);
            out.push(e);
            if stop {
                return Ok(out);
            }
        }
    }
}
