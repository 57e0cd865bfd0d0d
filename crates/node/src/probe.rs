//! Health probes against one instance's port: HTTP GET, TCP connect, or a
//! command. A probe answers `Ok` or a short description of what failed
//! (`GET /healthz answered 503`), which ends up in the step's error.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fleet_core::manifest::Probe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proc::{path_with, resolve_program, GroupGuard};
use crate::util::human;

/// Run one probe of `port`, bounded by `timeout`.
pub async fn probe(probe: &Probe, port: u16, timeout: Duration, path_prepend: &[PathBuf], cwd: &Path) -> Result<(), String> {
    let what = describe(probe, port);
    match tokio::time::timeout(timeout, run(probe, port, path_prepend, cwd)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{what}: no answer within {}", human(timeout))),
    }
}

/// `GET /healthz`, `TCP connect to 127.0.0.1:P`, `` `check 8080` ``.
pub fn describe(probe: &Probe, port: u16) -> String {
    match probe {
        Probe::Http { path } => format!("GET {path}"),
        Probe::Tcp => format!("TCP connect to 127.0.0.1:{port}"),
        Probe::Command { argv } => format!("`{}`", substitute(argv, port).join(" ")),
        Probe::Image => "the image's HEALTHCHECK".into(),
    }
}

fn substitute(argv: &[String], port: u16) -> Vec<String> {
    argv.iter().map(|a| a.replace("{port}", &port.to_string())).collect()
}

async fn run(probe: &Probe, port: u16, path_prepend: &[PathBuf], cwd: &Path) -> Result<(), String> {
    match probe {
        Probe::Http { path } => http_get(port, path).await,
        Probe::Tcp => {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.map(|_| ()).map_err(|e| format!("TCP connect to 127.0.0.1:{port}: {e}"))
        }
        Probe::Command { argv } => command(&substitute(argv, port), path_prepend, cwd).await,
        // Only a container has an image: the docker adapter asks the engine
        // instead of probing (the manifest refuses it for `process`).
        Probe::Image => Err("the image's HEALTHCHECK is asked of the Docker Engine, not probed; use http, tcp or command here".into()),
    }
}

async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let what = format!("GET {path}");
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.map_err(|e| format!("{what}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: fleet-node\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("{what}: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = s.read(&mut chunk).await.map_err(|e| format!("{what}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let status = match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code,
        _ if buf.is_empty() => return Err(format!("{what}: the connection closed without an answer")),
        _ => return Err(format!("{what}: not an HTTP answer ({:?})", line.chars().take(60).collect::<String>())),
    };
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("{what} answered {status}"))
    }
}

async fn command(argv: &[String], path_prepend: &[PathBuf], cwd: &Path) -> Result<(), String> {
    let what = format!("`{}`", argv.join(" "));
    let Some(first) = argv.first() else { return Err("the health command is empty".into()) };
    let program = resolve_program(first, path_prepend).map_err(|e| format!("{what}: {e}"))?;
    let child = tokio::process::Command::new(program)
        .args(&argv[1..])
        .current_dir(cwd)
        .env("PATH", path_with(path_prepend))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let _guard = child.id().map(GroupGuard::new);
    let out = child.wait_with_output().await.map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    let last = text.lines().last().unwrap_or("").chars().take(200).collect::<String>();
    let how = crate::proc::describe_exit(&out.status);
    Err(if last.is_empty() { format!("{what} {how}") } else { format!("{what} {how}: {last}") })
}
