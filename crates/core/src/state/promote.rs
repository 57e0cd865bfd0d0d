//! `PromoteDeployment`: a paused canary continues (the rules are
//! `Deployment::promote`, in `deploy::canary`).

use super::{deployment_number, Ctx, State};
use crate::command::Response;

impl State {
    pub(super) fn promote(&mut self, cx: &mut Ctx, id: &str, actor: &str) -> Response {
        let Some((n, d)) = deployment_number(id).and_then(|n| Some((n, self.deployments.get_mut(&n)?))) else {
            return Response::NotFound { what: format!("deployment `{id}`; `fleetctl list` shows the deployments") };
        };
        if let Err(reason) = d.promote(cx.at_ms, actor) {
            return Response::Rejected { reason };
        }
        let state = d.state;
        self.put_deployment(cx, n);
        self.after_progress(cx, n);
        Response::Deployment { id: id.to_string(), state }
    }
}
