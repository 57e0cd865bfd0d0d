//! Registry credentials from the node's Docker config file (`docker login` writes them).
//!
//! Only the `auths` section with base64 `auth` entries ("user:password") is read; credential
//! stores and helpers (`credsStore`, `credHelpers`) are not supported: log in without one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bollard::auth::DockerCredentials;
use serde::Deserialize;

use crate::error::DockerError;

/// The key `docker login` uses for Docker Hub.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";
const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

/// The registry credentials found in one Docker config file.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    /// Where they were read from (also when the file does not exist), for messages.
    pub path: PathBuf,
    /// Registry host (`docker.io`, `registry.example:5000`) → credentials.
    auths: HashMap<String, RegistryCredentials>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    auths: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl DockerConfig {
    /// The node's config file: `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn default_path() -> PathBuf {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("config.json");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        home.join(".docker").join("config.json")
    }

    /// Reads `path`; a missing file means no credentials, a malformed one is an error naming it.
    pub fn load(path: &Path) -> Result<DockerConfig, DockerError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig { path: path.to_path_buf(), auths: HashMap::new() });
            }
            Err(e) => return Err(DockerError::Config { path: path.to_path_buf(), reason: e.to_string() }),
        };
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<DockerConfig, DockerError> {
        let bad = |reason: String| DockerError::Config { path: path.to_path_buf(), reason };
        let file: File = serde_json::from_str(text).map_err(|e| bad(format!("not a Docker config JSON document: {e}")))?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let creds = match (entry.auth.as_deref().filter(|a| !a.is_empty()), entry.username, entry.password) {
                (Some(auth), _, _) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|e| bad(format!("auths.\"{key}\".auth is not base64: {e}")))?;
                    let decoded = String::from_utf8(decoded).map_err(|_| bad(format!("auths.\"{key}\".auth is not UTF-8 text")))?;
                    let (user, pass) =
                        decoded.split_once(':').ok_or_else(|| bad(format!("auths.\"{key}\".auth does not decode to `user:password`")))?;
                    RegistryCredentials { username: user.to_string(), password: pass.to_string() }
                }
                (None, Some(username), Some(password)) => RegistryCredentials { username, password },
                // An entry without a secret (a credential helper keeps it elsewhere): nothing to send.
                _ => continue,
            };
            auths.insert(registry_key(&key), creds);
        }
        Ok(DockerConfig { path: path.to_path_buf(), auths })
    }

    /// The credentials for the registry `image` lives in, if any.
    pub fn credentials_for(&self, image: &str) -> Option<&RegistryCredentials> {
        self.auths.get(&registry_of(image))
    }

    pub(crate) fn bollard_credentials(&self, image: &str) -> Option<DockerCredentials> {
        let registry = registry_of(image);
        let creds = self.auths.get(&registry)?;
        Some(DockerCredentials {
            username: Some(creds.username.clone()),
            password: Some(creds.password.clone()),
            serveraddress: Some(if registry == DOCKER_HUB { DOCKER_HUB_KEY.to_string() } else { registry }),
            ..DockerCredentials::default()
        })
    }
}

/// `https://registry.example:5000/v2/` → `registry.example:5000`; Docker Hub's aliases → `docker.io`.
fn registry_key(key: &str) -> String {
    let host = key.trim_start_matches("https://").trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

/// The registry of an image reference, by Docker's rule: the first path component is a registry
/// when it has a `.` or a `:` or is `localhost`; otherwise the image is on Docker Hub.
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => registry_key(first),
        _ => DOCKER_HUB.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn reads_auths_and_matches_registries() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "registry.example:5000": {{"auth": "{}"}},
                "https://ghcr.example/v2/": {{"username": "u3", "password": "p3"}},
                "helper.example": {{}}
            }}, "credsStore": "desktop"}}"#,
            b64("hubuser:hub:pass"),
            b64("u2:p2")
        );
        let cfg = DockerConfig::parse(Path::new("config.json"), &text).unwrap();
        let hub = cfg.credentials_for("library/nginx:1").unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("hubuser", "hub:pass"));
        assert_eq!(cfg.credentials_for("nginx").unwrap().username, "hubuser");
        assert_eq!(cfg.credentials_for("registry.example:5000/team/web:v1").unwrap().username, "u2");
        assert_eq!(cfg.credentials_for("ghcr.example/x/y").unwrap().password, "p3");
        assert!(cfg.credentials_for("helper.example/x").is_none());
        assert!(cfg.credentials_for("other.example/x").is_none());
        let hub = cfg.bollard_credentials("nginx").unwrap();
        assert_eq!(hub.serveraddress.as_deref(), Some(DOCKER_HUB_KEY));
    }

    #[test]
    fn broken_entries_name_the_file_and_the_key() {
        let e = DockerConfig::parse(Path::new("/etc/x/config.json"), r#"{"auths": {"r.example": {"auth": "%%%"}}}"#).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/x/config.json") && msg.contains("r.example"), "{msg}");
        assert_eq!(e.class(), fleet_core::deploy::ErrorClass::Invalid);
        let e =
            DockerConfig::parse(Path::new("c.json"), &format!(r#"{{"auths": {{"r": {{"auth": "{}"}}}}}}"#, b64("nocolon"))).unwrap_err();
        assert!(e.to_string().contains("user:password"), "{e}");
        assert!(DockerConfig::parse(Path::new("c.json"), "not json").is_err());
    }

    #[test]
    fn missing_file_means_no_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DockerConfig::load(&dir.path().join("config.json")).unwrap();
        assert!(cfg.credentials_for("nginx").is_none());
    }

    #[test]
    fn registry_rule() {
        assert_eq!(registry_of("web"), "docker.io");
        assert_eq!(registry_of("team/web:v1"), "docker.io");
        assert_eq!(registry_of("localhost/web"), "localhost");
        assert_eq!(registry_of("127.0.0.1:5000/web"), "127.0.0.1:5000");
        assert_eq!(registry_key("https://index.docker.io/v1/"), "docker.io");
    }
}
