//! What this adapter runs, for the node's instance report (destination
//! sync): one server per app of a destination, its active container as
//! the engine sees it now. A container that is gone, stopped, unhealthy
//! per its image's HEALTHCHECK, or changed by hand (another image, or
//! another release label than the one Fleet recorded) is reported
//! unhealthy, with the release it really runs (none when it is gone), so
//! the leader shows the drift.

use fleet_docker::{ContainerInfo, Health};

use super::{docker_err, Container, Inner};
use crate::adapter::{Server, StepError};

/// What the engine says of the recorded active container: the release
/// it runs, and whether it is as Fleet left it.
fn verdict(c: &Container, info: Option<&ContainerInfo>) -> (Option<String>, Result<(), String>) {
    let Some(info) = info else {
        return (None, Err(format!("container {} is gone (removed outside Fleet); deploy again to replace it", c.name)));
    };
    let labelled = info.fleet.as_ref().map(|l| l.release.clone());
    let release = labelled.clone().or_else(|| Some(c.release.clone()));
    let want_image = c.spec.image_for(&c.release).unwrap_or_default();
    if labelled.as_deref() != Some(c.release.as_str()) {
        let what = labelled.map(|r| format!("release label `{r}`")).unwrap_or_else(|| "no Fleet labels".into());
        return (release, Err(format!("container {} was changed outside Fleet: it has {what}, Fleet started {}", c.name, c.release)));
    }
    if !want_image.is_empty() && info.image != want_image {
        return (release, Err(format!("container {} runs image {} instead of {want_image} (changed outside Fleet)", c.name, info.image)));
    }
    if !info.is_running() {
        let code = info.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
        return (release, Err(format!("container {} is not running ({:?}{code}); see `docker logs {}`", c.name, info.state, c.name)));
    }
    if info.health == Health::Unhealthy {
        return (release, Err(format!("container {} reports unhealthy (its image's HEALTHCHECK)", c.name)));
    }
    (release, Ok(()))
}

impl Inner {
    /// Destinations with at least one app recorded here.
    pub(super) fn destinations(&self) -> Vec<String> {
        let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = apps.keys().map(|(d, _)| d.clone()).collect();
        out.dedup();
        out
    }

    /// The recorded active container and route address of each app of `destination`.
    fn actives(&self, destination: &str) -> Vec<(String, Option<Container>, Option<String>)> {
        let apps: Vec<_> = {
            let apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
            apps.iter().filter(|((d, _), _)| d == destination).map(|(_, a)| a.clone()).collect()
        };
        apps.iter()
            .map(|a| {
                let st = a.lock();
                (a.name.clone(), st.active.clone(), st.route.as_ref().map(|r| r.addr().to_string()))
            })
            .collect()
    }

    /// One server per app of `destination`: `id` is the container's name,
    /// `release` what the engine says it runs.
    pub(super) async fn discover(&self, destination: &str) -> Result<Vec<Server>, StepError> {
        let mut out = Vec::new();
        for (app, active, address) in self.actives(destination) {
            let release = match &active {
                None => None,
                Some(c) => {
                    let info = self.engine().await?.inspect(&c.name).await.map_err(docker_err)?;
                    verdict(c, info.as_ref()).0
                }
            };
            out.push(Server { id: active.map(|c| c.name).unwrap_or_default(), app, address, release });
        }
        Ok(out)
    }

    pub(super) async fn server_health(&self, destination: &str, server: &Server) -> Result<(), StepError> {
        let active = self.actives(destination).into_iter().find(|(app, ..)| *app == server.app).and_then(|(_, c, _)| c);
        let Some(c) = active else {
            return Err(StepError::resource(format!("no active container of {} runs here", server.app)));
        };
        let info = self.engine().await?.inspect(&c.name).await.map_err(docker_err)?;
        verdict(&c, info.as_ref()).1.map_err(StepError::resource)
    }
}
