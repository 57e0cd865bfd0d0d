//! What every command handler shares: the exit-code error, the connection
//! from flags or a context file, error lines, and small helpers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_core::deploy::Deployment;
use fleet_core::manifest::ManifestError;
use fleetctl::client::{exit_code_of, Client, Context};
use fleetctl::exit;
use fleetctl::output::{ErrorLine, Line};
use serde::Serialize;
use serde_json::Value;

use crate::cli::{ConnArgs, Output};

/// An error carrying the exit code to use.
pub struct Exit(pub i32, pub anyhow::Error);

impl From<anyhow::Error> for Exit {
    /// The server's answer decides the code (invalid → 2, rejected → 7);
    /// no answer at all is a cluster error (1).
    fn from(e: anyhow::Error) -> Self {
        Exit(exit_code_of(&e), e)
    }
}

pub fn usage(e: impl Into<anyhow::Error>) -> Exit {
    Exit(exit::USAGE, e.into())
}

/// Print one JSON value on a line of its own.
pub fn print_json(v: &impl Serialize) {
    match serde_json::to_string(v) {
        Ok(text) => println!("{text}"),
        // Only a map with non-string keys fails, and none is printed.
        Err(e) => eprintln!("fleetctl: cannot print the answer as JSON: {e}"),
    }
}

fn context(conn: &ConnArgs) -> Result<Context, Exit> {
    let file = conn.context.clone().or_else(|| {
        let p = PathBuf::from(".fleet-dev/context.json");
        p.is_file().then_some(p)
    });
    let base = match &file {
        Some(p) => Some(Context::load(p).map_err(usage)?),
        None => None,
    };
    let need = |flag: &str, v: Option<PathBuf>, from: Option<&PathBuf>| -> Result<PathBuf, Exit> {
        v.or_else(|| from.cloned()).ok_or_else(|| {
            usage(anyhow::anyhow!(
                "no {flag} given; pass --{flag} (or FLEET_{}), or a context file from `fleetctl dev up`",
                flag.to_uppercase()
            ))
        })
    };
    let addrs = if conn.addr.is_empty() { base.as_ref().map(|b| b.addrs.clone()).unwrap_or_default() } else { conn.addr.clone() };
    if addrs.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "no coordinator address; pass --addr HOST:PORT[,...], set FLEET_ADDR, or run `fleetctl dev up`"
        )));
    }
    Ok(Context {
        addrs,
        ca: need("ca", conn.ca.clone(), base.as_ref().map(|b| &b.ca))?,
        cert: need("cert", conn.cert.clone(), base.as_ref().map(|b| &b.cert))?,
        key: need("key", conn.key.clone(), base.as_ref().map(|b| &b.key))?,
    })
}

/// A client for the cluster the flags (or the context file) name.
pub fn client(conn: &ConnArgs) -> Result<Client, Exit> {
    let mut c = Client::new(&context(conn)?).map_err(usage)?;
    c.retry_for = conn.retry_for;
    Ok(c)
}

/// Unix milliseconds as an RFC 3339 time (seconds).
pub fn since(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A call's error as an exit: in JSON mode also a `{"type":"error"}` line
/// on stdout, so a CI job parsing the output sees why.
pub fn failed(out: Output, e: anyhow::Error) -> Exit {
    let code = exit_code_of(&e);
    if out == Output::Json {
        print_json(&Line::Error(ErrorLine::failed(code, None, format!("{e:#}"))));
    }
    Exit(code, e)
}

/// An invalid local file: `error: fleet.yaml: health.interval: ...` plus a
/// hint, exit 2; nothing was sent.
pub fn invalid(out: Output, e: &ManifestError, hint: &str) -> i32 {
    eprintln!("error: {e}");
    eprintln!("hint: nothing was submitted; {hint}");
    if out == Output::Json {
        print_json(&Line::Error(ErrorLine {
            exit_code: exit::USAGE,
            id: None,
            message: None,
            error: Some("invalid_file".into()),
            file: Some(e.file.clone()),
            field: Some(e.field.clone()),
            reason: Some(e.reason.clone()),
        }));
    }
    exit::USAGE
}

pub fn read_file(out: Output, path: &Path, what: &str, hint: &str) -> Result<String, i32> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read {what} {}: {e}", path.display());
        eprintln!("hint: {hint}");
        if out == Output::Json {
            print_json(&Line::Error(ErrorLine {
                exit_code: exit::USAGE,
                id: None,
                message: None,
                error: Some("unreadable_file".into()),
                file: Some(path.display().to_string()),
                field: None,
                reason: Some(e.to_string()),
            }));
        }
        exit::USAGE
    })
}

pub fn check_id(id: &str) -> Result<(), Exit> {
    if fleet_core::state::deployment_number(id).is_none() {
        return Err(usage(anyhow::anyhow!("`{id}` is not a deployment id; ids look like d12, and `fleetctl list` shows them")));
    }
    Ok(())
}

pub fn parse_deployment(json: &str) -> Result<Deployment, Exit> {
    serde_json::from_str(json)
        .map_err(|e| anyhow::anyhow!("a coordinator sent a deployment this fleetctl cannot read ({e}); are both the same version?").into())
}

/// A duration as milliseconds on the wire (0: not given).
pub fn ms(d: Option<Duration>) -> u64 {
    d.map(|d| d.as_millis().min(u64::MAX as u128) as u64).unwrap_or(0)
}

/// Records the server sent as JSON text, printed as one JSON array.
pub fn print_json_array(items: &[String]) -> Result<(), Exit> {
    let values: Vec<Value> = items
        .iter()
        .map(|j| serde_json::from_str(j))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("a coordinator sent a record that is not JSON: {e}"))?;
    println!("{}", Value::Array(values));
    Ok(())
}
