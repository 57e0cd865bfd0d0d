//! Coordinator configuration in two stages: raw values from flags and an
//! optional TOML file (flags win) → a validated [`Config`]. A bad value
//! names its field and stops the process before the data dir is touched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use thiserror::Error;

/// Leader heartbeat (also openraft's AppendEntries timeout), milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u64 = 50;
/// Minimum election timeout, milliseconds (see `election_timeout_ms`):
/// three heartbeats; a follower stands after 450–600 ms without a leader.
/// Measured in docs/benchmarks.md (40 kill -9s of the leader: p50 0.61 s,
/// p99 0.77 s to the first acknowledged write, against 1.6 s / 1.9 s with
/// the earlier 100 ms / 400 ms). Shorter settings were slower: with
/// 40 ms / 120 ms, half the elections took a second round.
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 150;

/// Raw settings as written by a person: every field optional.
#[derive(Debug, Default, Clone, Deserialize, Parser)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[command(
    name = "fleet-coord",
    version,
    about = "Fleet coordinator: replicates deployment state and destination locks through Raft",
    long_about = "Fleet coordinator: replicates deployment state and destination locks through Raft.\n\n\
Start the first coordinator of a new cluster with --bootstrap, the others without it, then add \
them with `fleetctl cluster add-learner ID ADDR` and `fleetctl cluster promote ID`. \
`fleetctl dev up` does all of this on one machine.\n\n\
Settings come from flags or from a TOML file (--config) whose keys are the flag names \
(for example `data-dir = \"/var/lib/fleet\"`); flags win."
)]
pub struct RawConfig {
    /// TOML file with any of the settings below.
    #[arg(long, env = "FLEET_COORD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This coordinator's id in the cluster (1, 2, 3, ...). Never reuse an id.
    #[arg(long)]
    pub id: Option<u64>,
    /// Address to listen on; port 0 picks a free one (see --addr-file).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address other coordinators and clients use to reach this one
    /// (default: the address actually bound).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory for the Raft log, vote and state machine (RocksDB).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CA certificate of the cluster (PEM).
    #[arg(long, env = "FLEET_CA")]
    pub ca: Option<PathBuf>,
    /// This coordinator's certificate (role `coordinator`).
    #[arg(long, env = "FLEET_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key of the certificate.
    #[arg(long, env = "FLEET_KEY")]
    pub key: Option<PathBuf>,
    /// Make this coordinator the single voter of a new cluster if its data
    /// dir is empty. Harmless on restart.
    #[arg(long)]
    #[serde(default)]
    pub bootstrap: bool,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Leader heartbeat interval in milliseconds (default 50).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds; the maximum is twice this
    /// (default 150). A follower that knew a leader waits the maximum
    /// (openraft's leader lease) plus its own timeout before it stands, so
    /// a dead leader is replaced after 3–4 times this.
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// Build a snapshot (and purge the log behind it) every this many
    /// entries (default 10000).
    #[arg(long)]
    pub snapshot_logs: Option<u64>,
    /// How often the leader syncs each destination's servers with what
    /// the nodes report, in milliseconds (default 5000).
    #[arg(long)]
    pub sync_interval_ms: Option<u64>,
    /// Serve the HTTPS JSON API, events, health and /metrics on this
    /// address (mTLS with the same certificates and roles as gRPC); port 0
    /// picks a free one (see --http-addr-file). Off when not given.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Write the bound HTTP API address to this file once listening.
    #[arg(long)]
    pub http_addr_file: Option<PathBuf>,
    /// Log format on stderr: `text` (default) or `json` (one JSON object per line).
    #[arg(long)]
    pub log_format: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub id: u64,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bootstrap: bool,
    pub addr_file: Option<PathBuf>,
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    pub snapshot_logs: u64,
    /// How often each destination's servers are synced (`crate::sync`).
    pub sync_interval: Duration,
    pub http_addr: Option<SocketAddr>,
    pub http_addr_file: Option<PathBuf>,
    pub log_format: LogFormat,
}

/// How the coordinator writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is not a log format; use text or json")),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("`{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, reason: reason.into() }
}

impl RawConfig {
    /// Fill what the flags left out from the config file, if one is given.
    pub fn merge_file(self) -> Result<RawConfig, ConfigError> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text =
            std::fs::read_to_string(&path).map_err(|e| ConfigError::File { file: path.clone(), reason: format!("cannot read it: {e}") })?;
        let file: RawConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::File { file: path.clone(), reason: format!("{e}; keys are the flag names, e.g. `data-dir`") })?;
        Ok(RawConfig {
            config: self.config,
            id: self.id.or(file.id),
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            data_dir: self.data_dir.or(file.data_dir),
            ca: self.ca.or(file.ca),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            bootstrap: self.bootstrap || file.bootstrap,
            addr_file: self.addr_file.or(file.addr_file),
            heartbeat_ms: self.heartbeat_ms.or(file.heartbeat_ms),
            election_timeout_ms: self.election_timeout_ms.or(file.election_timeout_ms),
            snapshot_logs: self.snapshot_logs.or(file.snapshot_logs),
            sync_interval_ms: self.sync_interval_ms.or(file.sync_interval_ms),
            http_addr: self.http_addr.or(file.http_addr),
            http_addr_file: self.http_addr_file.or(file.http_addr_file),
            log_format: self.log_format.or(file.log_format),
        })
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let id = self.id.ok_or_else(|| field("id", "missing; give each coordinator a distinct id such as --id 1"))?;
        if id == 0 {
            return Err(field("id", "must be 1 or more"));
        }
        let listen_raw = self.listen.unwrap_or_else(|| "127.0.0.1:7400".to_string());
        let listen: SocketAddr =
            listen_raw.parse().map_err(|e| field("listen", format!("`{listen_raw}` is not IP:PORT ({e}); for example 0.0.0.0:7400")))?;
        if let Some(a) = &self.advertise {
            a.parse::<SocketAddr>().map_err(|e| field("advertise", format!("`{a}` is not IP:PORT ({e})")))?;
        }
        let data_dir = self.data_dir.ok_or_else(|| field("data-dir", "missing; for example --data-dir /var/lib/fleet"))?;
        let file = |name: &'static str, p: Option<PathBuf>| -> Result<PathBuf, ConfigError> {
            let p = p.ok_or_else(|| field(name, "missing; create certificates with `fleetctl certs init --out DIR`"))?;
            if !Path::new(&p).is_file() {
                return Err(field(name, format!("{} is not a readable file", p.display())));
            }
            Ok(p)
        };
        let ca = file("ca", self.ca)?;
        let cert = file("cert", self.cert)?;
        let key = file("key", self.key)?;
        let heartbeat_ms = self.heartbeat_ms.unwrap_or(DEFAULT_HEARTBEAT_MS);
        let election_ms = self.election_timeout_ms.unwrap_or(DEFAULT_ELECTION_TIMEOUT_MS);
        if heartbeat_ms == 0 {
            return Err(field("heartbeat-ms", "must be more than 0"));
        }
        // Twice a heartbeat past u64: any election timeout is too short.
        if heartbeat_ms.checked_mul(2).is_none_or(|twice| election_ms < twice) {
            return Err(field(
                "election-timeout-ms",
                format!("{election_ms} is less than twice the heartbeat ({heartbeat_ms} ms); followers would start elections under a healthy leader"),
            ));
        }
        let snapshot_logs = self.snapshot_logs.unwrap_or(10_000);
        if snapshot_logs == 0 {
            return Err(field("snapshot-logs", "must be more than 0"));
        }
        let http_addr = match &self.http_addr {
            None => None,
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .map_err(|e| field("http-addr", format!("`{a}` is not IP:PORT ({e}); for example 127.0.0.1:7480")))?,
            ),
        };
        if self.http_addr_file.is_some() && http_addr.is_none() {
            return Err(field("http-addr-file", "needs --http-addr (the API is off without it)"));
        }
        let log_format = match &self.log_format {
            None => LogFormat::Text,
            Some(f) => f.parse().map_err(|e: String| field("log-format", e))?,
        };
        let sync_interval_ms = self.sync_interval_ms.unwrap_or(5000);
        if sync_interval_ms < 100 {
            return Err(field("sync-interval-ms", format!("{sync_interval_ms} is too short; use 100 or more (default 5000)")));
        }
        Ok(Config {
            sync_interval: Duration::from_millis(sync_interval_ms),
            id,
            listen,
            advertise: self.advertise,
            data_dir,
            ca,
            cert,
            key,
            bootstrap: self.bootstrap,
            addr_file: self.addr_file,
            heartbeat: Duration::from_millis(heartbeat_ms),
            election_timeout: Duration::from_millis(election_ms),
            snapshot_logs,
            http_addr,
            http_addr_file: self.http_addr_file,
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> RawConfig {
        for f in ["ca.pem", "c.pem", "k.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        RawConfig {
            id: Some(1),
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.join("data")),
            ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join("c.pem")),
            key: Some(dir.join("k.pem")),
            ..Default::default()
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        type Break = Box<dyn Fn(&mut RawConfig)>;
        let cases: Vec<(&str, Break)> = vec![
            ("id", Box::new(|c| c.id = Some(0))),
            ("id", Box::new(|c| c.id = None)),
            ("listen", Box::new(|c| c.listen = Some("nowhere".into()))),
            ("advertise", Box::new(|c| c.advertise = Some("x:y".into()))),
            ("data-dir", Box::new(|c| c.data_dir = None)),
            ("cert", Box::new(|c| c.cert = Some("/nonexistent/cert.pem".into()))),
            ("election-timeout-ms", Box::new(|c| c.election_timeout_ms = Some(50))),
            ("heartbeat-ms", Box::new(|c| c.heartbeat_ms = Some(0))),
            // Twice this heartbeat overflows (found by the property test below).
            ("election-timeout-ms", Box::new(|c| c.heartbeat_ms = Some(u64::MAX / 2 + 1))),
            ("snapshot-logs", Box::new(|c| c.snapshot_logs = Some(0))),
            ("http-addr", Box::new(|c| c.http_addr = Some("localhost".into()))),
            ("http-addr-file", Box::new(|c| c.http_addr_file = Some("http.addr".into()))),
            ("log-format", Box::new(|c| c.log_format = Some("xml".into()))),
        ];
        for (want, mutate) in cases {
            let mut raw = base(dir.path());
            mutate(&mut raw);
            let err = raw.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("`{want}`")), "{want}: {err}");
        }
        assert!(base(dir.path()).validate().is_ok());
    }

    // Bad input is a fault too: whatever a config file holds, reading and
    // validating it answers Ok or an error naming the problem, never a panic.
    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]
        #[test]
        fn any_config_file_is_read_or_refused_without_a_panic(
            text in proptest::prop_oneof![
                proptest::prelude::any::<String>(),
                "[a-z-]{1,20} = [0-9]{1,25}\n[a-z-]{1,20} = \"[ -~]{0,30}\"\n",
                proptest::collection::vec(
                    proptest::prop_oneof![
                        "id = -?[0-9]{1,22}",
                        "heartbeat-ms = [0-9]{1,22}",
                        "election-timeout-ms = [0-9]{1,22}",
                        "snapshot-logs = [0-9]{1,22}",
                        "listen = \"[ -~]{0,40}\"",
                        "http-addr = \"[ -~]{0,40}\"",
                        "log-format = \"[a-z]{0,6}\"",
                        "data-dir = \"[ -~]{0,40}\"",
                        "\\[[a-z]{1,8}\\]",
                    ],
                    0..8,
                ).prop_map(|lines: Vec<String>| lines.join("\n")),
            ]
        ) {
            let dir = tempfile::tempdir().unwrap();
            let cfg = dir.path().join("coord.toml");
            std::fs::write(&cfg, &text).unwrap();
            let mut raw = base(dir.path());
            raw.id = None;
            raw.listen = None;
            raw.config = Some(cfg);
            match raw.merge_file() {
                Ok(raw) => {
                    if let Err(e) = raw.validate() {
                        proptest::prop_assert!(!e.to_string().is_empty());
                    }
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains("coord.toml") || !e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn file_values_fill_gaps_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("coord.toml");
        std::fs::write(&cfg, "id = 7\nheartbeat-ms = 20\nelection-timeout-ms = 100\n").unwrap();
        let mut raw = base(dir.path());
        raw.config = Some(cfg.clone());
        raw.heartbeat_ms = Some(30);
        let c = raw.merge_file().unwrap().validate().unwrap();
        assert_eq!(c.id, 1, "flag wins");
        assert_eq!(c.heartbeat, Duration::from_millis(30));
        assert_eq!(c.election_timeout, Duration::from_millis(100), "file fills the gap");

        std::fs::write(&cfg, "idd = 7\n").unwrap();
        let mut raw = base(dir.path());
        raw.config = Some(cfg);
        assert!(raw.merge_file().unwrap_err().to_string().contains("idd"));
    }
}
