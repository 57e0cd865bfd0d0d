//! Test images built on the node's engine `FROM scratch`, with no registry and no `docker` CLI.
//!
//! The build context is a tar made here: Debian's static busybox (a shell, `httpd`, `nc`), a
//! script that serves `release=<RELEASE>` over HTTP with busybox `httpd`, and a HEALTHCHECK
//! script that probes it with `nc` (busybox `wget` is not used: it crashes in these images).
//! It is posted to the engine's build API through bollard.
//!
//! Tests here and in the workspace's `tests/` reuse it:
//! ```no_run
//! # async fn f(engine: &fleet_docker::Engine) -> Result<(), fleet_docker::DockerError> {
//! use fleet_docker::testimage::{build_web_image, WebImage};
//! let tag = build_web_image(engine, &WebImage::new("fleet-test/web:v1", "v1")).await?;
//! # Ok(()) }
//! ```
//! A container of it listens on [`WEB_PORT`] and answers `GET /` with `release=<release>\n`
//! (the build arg, or the `RELEASE` env var given at create time), and `GET /healthz` with `ok`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bollard::query_parameters::BuildImageOptions;
use futures::StreamExt;

use crate::engine::Engine;
use crate::error::{error_chain, DockerError};

/// The port the test web server listens on inside the container.
pub const WEB_PORT: u16 = 8080;

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX_PATHS: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];

/// One image to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebImage {
    /// Tag such as `fleet-test/web:v1`.
    pub tag: String,
    /// What `GET /` answers (`release=<release>`), unless the container's env sets `RELEASE`.
    pub release: String,
    /// `false`: the image's HEALTHCHECK always fails (the server still serves).
    pub healthy: bool,
}

impl WebImage {
    pub fn new(tag: impl Into<String>, release: impl Into<String>) -> WebImage {
        WebImage { tag: tag.into(), release: release.into(), healthy: true }
    }

    /// The variant whose health check fails.
    pub fn unhealthy(tag: impl Into<String>, release: impl Into<String>) -> WebImage {
        WebImage { healthy: false, ..WebImage::new(tag, release) }
    }
}

const DOCKERFILE: &str = "\
FROM scratch
COPY busybox /bin/busybox
COPY serve.sh health.sh /
ARG RELEASE=dev
ARG HEALTHY=1
ENV RELEASE=$RELEASE FLEET_TEST_HEALTHY=$HEALTHY PORT=8080 PATH=/bin
LABEL org.fleet-test.image=web
EXPOSE 8080
HEALTHCHECK --interval=1s --timeout=3s --retries=2 CMD [\"/bin/busybox\", \"sh\", \"/health.sh\"]
ENTRYPOINT [\"/bin/busybox\", \"sh\", \"/serve.sh\"]
";

const SERVE_SH: &str = r#"set -e
/bin/busybox --install -s /bin
mkdir -p /www
printf 'release=%s\n' "$RELEASE" > /www/index.html
echo ok > /www/healthz
# A shell as PID 1 with a trap: `docker stop` ends it at once instead of waiting for SIGKILL.
httpd -f -p "$PORT" -h /www &
pid=$!
trap 'kill "$pid"; exit 0' TERM INT
wait "$pid"
"#;

const HEALTH_SH: &str = r#"[ "$FLEET_TEST_HEALTHY" = 1 ] || { echo "this image fails its health check on purpose"; exit 1; }
printf 'GET /healthz HTTP/1.0\r\n\r\n' | nc 127.0.0.1 "$PORT" | grep -q '^ok'
"#;

static APT: Mutex<()> = Mutex::new(());

fn is_static_busybox(path: &Path) -> bool {
    std::fs::read(path).ok().and_then(|bytes| elf_is_static(&bytes)).unwrap_or(false)
}

/// Whether an ELF executable has no program interpreter (`PT_INTERP`), i.e. runs `FROM scratch`.
/// `None` if it is not a little-endian ELF file.
fn elf_is_static(bytes: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if !bytes.starts_with(b"\x7fELF") || bytes.get(5) != Some(&1) {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    let (phoff, phentsize, phnum) = match bytes.get(4)? {
        1 => (u64::from(u32_at(0x1c)?), u16_at(0x2a)?, u16_at(0x2c)?),
        2 => (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?),
        _ => return None,
    };
    let phoff = usize::try_from(phoff).ok()?;
    for i in 0..usize::from(phnum) {
        if u32_at(phoff + i * usize::from(phentsize))? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

fn find_static_busybox() -> Option<PathBuf> {
    BUSYBOX_PATHS.iter().map(PathBuf::from).find(|p| is_static_busybox(p))
}

/// The static busybox binary, installing Debian's `busybox-static` with apt-get first if it is
/// missing (tests run as root on CI and developer machines).
pub fn ensure_busybox() -> Result<PathBuf, DockerError> {
    if let Some(p) = find_static_busybox() {
        return Ok(p);
    }
    let _guard = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(p) = find_static_busybox() {
        return Ok(p);
    }
    let apt = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("apt-get {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    let install = ["install", "-y", "-q", "busybox-static"];
    if apt(&install).is_err() {
        // Package lists may be missing on a fresh machine.
        let _ = apt(&["update", "-q"]);
        apt(&install).map_err(|message| DockerError::Build {
            tag: "(test image context)".into(),
            message: format!(
                "a static busybox is needed and could not be installed ({message}); run `apt-get install -y busybox-static` as root"
            ),
        })?;
    }
    find_static_busybox().ok_or_else(|| DockerError::Build {
        tag: "(test image context)".into(),
        message: "busybox-static was installed but no static busybox is at /bin/busybox".into(),
    })
}

/// The build context: a ustar archive of the Dockerfile, busybox and the two scripts.
pub fn build_context(busybox: &Path) -> Result<Vec<u8>, DockerError> {
    let binary = std::fs::read(busybox).map_err(|e| DockerError::Build {
        tag: "(test image context)".into(),
        message: format!("cannot read {}: {e}", busybox.display()),
    })?;
    let mut tar = Vec::with_capacity(binary.len() + 8192);
    append(&mut tar, "Dockerfile", 0o644, DOCKERFILE.as_bytes());
    append(&mut tar, "busybox", 0o755, &binary);
    append(&mut tar, "serve.sh", 0o755, SERVE_SH.as_bytes());
    append(&mut tar, "health.sh", 0o755, HEALTH_SH.as_bytes());
    tar.extend_from_slice(&[0u8; 1024]);
    Ok(tar)
}

/// One regular file in ustar format (names are short; mtime 0 keeps the context reproducible).
fn append(tar: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let mut h = [0u8; 512];
    let octal = |field: &mut [u8], value: u64| {
        let text = format!("{:0width$o}", value, width = field.len() - 1);
        field[..text.len()].copy_from_slice(text.as_bytes());
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], data.len() as u64);
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    tar.extend_from_slice(&h);
    tar.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    tar.extend(std::iter::repeat_n(0u8, pad));
}

/// Label on the built image: a digest of its context and build args. An image under the tag
/// with the same digest is not built again.
pub const CONTEXT_LABEL: &str = "org.fleet-test.context";

/// One build at a time in this process: tests running in parallel would otherwise build the same
/// tag twice and leave the loser behind as a dangling image. (A tokio mutex works across the
/// separate runtimes of `#[tokio::test]`s.)
static BUILDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds `image` on the engine (unless it is already there, built from the same context) and
/// returns its tag.
pub async fn build_web_image(engine: &Engine, image: &WebImage) -> Result<String, DockerError> {
    let busybox = ensure_busybox()?;
    let context = build_context(&busybox)?;
    let build_err = |message: String| DockerError::Build { tag: image.tag.clone(), message };
    let args = [("RELEASE", image.release.as_str()), ("HEALTHY", if image.healthy { "1" } else { "0" })];
    let mut digest_input = context.clone();
    for (k, v) in args {
        digest_input.extend_from_slice(format!("\0{k}={v}").as_bytes());
    }
    let digest = format!("{:016x}", fnv1a64(&digest_input));

    let _one_at_a_time = BUILDS.lock().await;
    if let Ok(existing) = engine.client().inspect_image(&image.tag).await {
        let labels = existing.config.and_then(|c| c.labels).unwrap_or_default();
        if labels.get(CONTEXT_LABEL) == Some(&digest) {
            return Ok(image.tag.clone());
        }
    }
    let options = BuildImageOptions {
        t: Some(image.tag.clone()),
        buildargs: Some(args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        labels: Some(HashMap::from([(CONTEXT_LABEL.to_string(), digest)])),
        rm: true,
        forcerm: true,
        ..BuildImageOptions::default()
    };
    let mut stream = engine.client().build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    return Err(build_err(detail.message.unwrap_or_else(|| "the engine reported an error".into())));
                }
            }
            Err(e) => return Err(build_err(error_chain(&e))),
        }
    }
    if !engine.image_exists(&image.tag).await? {
        return Err(build_err("the build finished but the engine has no image under that tag".into()));
    }
    Ok(image.tag.clone())
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic_executables() {
        // The test binary itself is dynamically linked (it has a loader).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_is_static(&me), Some(false));
        assert_eq!(elf_is_static(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn tar_headers_are_well_formed() {
        let mut tar = Vec::new();
        append(&mut tar, "serve.sh", 0o755, b"echo hi\n");
        assert_eq!(tar.len(), 1024);
        assert_eq!(&tar[..8], b"serve.sh");
        assert_eq!(&tar[124..136], b"00000000010\0");
        assert_eq!(&tar[257..262], b"ustar");
        // The checksum covers the header with its own field read as spaces.
        let mut copy = tar[..512].to_vec();
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|b| u32::from(*b)).sum();
        let stored = u32::from_str_radix(std::str::from_utf8(&tar[148..154]).unwrap(), 8).unwrap();
        assert_eq!(sum, stored);
        assert_eq!(&tar[512..520], b"echo hi\n");
    }
}
