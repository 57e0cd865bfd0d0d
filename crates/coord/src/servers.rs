//! The server calls of the `Control` service: `ListServers` (a
//! destination's servers as its sync task committed them) and
//! `RemoveDestination`.

use fleet_core::views::ServerView;
use fleet_core::{Command, Response as Outcome};
use fleet_proto::*;
use tonic::Status;

use crate::control::ControlService;
use crate::tls::KnownCaller;

fn validate(destination: &str) -> Result<(), Status> {
    fleet_core::names::validate_name("destination", destination).map_err(|e| Status::invalid_argument(e.to_string()))
}

impl ControlService {
    /// Answered by the leader: it overlays its own memory of when each
    /// node was last heard from (the committed time is coarse).
    pub(crate) fn list_servers(&self, r: ListServersRequest) -> Result<ServersReply, Status> {
        validate(&r.destination)?;
        self.leader_redirect_if_follower()?;
        let hub = self.hub();
        self.state().read(|a| {
            let mut list = ServerView::list(&a.state, &r.destination)
                .ok_or_else(|| Status::not_found(format!("no destination `{}`; `fleetctl destinations` lists them", r.destination)))?;
            for v in &mut list {
                if let Some(t) = hub.last_heard(&v.id) {
                    v.last_seen_ms = v.last_seen_ms.max(t);
                }
            }
            let servers_json = list
                .iter()
                .map(|v| serde_json::to_string(v).map_err(|e| Status::internal(format!("encoding a server: {e}"))))
                .collect::<Result<_, _>>()?;
            Ok(ServersReply { servers_json, applied_index: a.last_applied.map(|l| l.index).unwrap_or(0) })
        })
    }

    /// Refused with the `rejected` detail (fleetctl exit 7) while the
    /// destination is busy; its sync task stops when the removal applies.
    pub(crate) async fn remove_destination(&self, who: &KnownCaller, r: RemoveDestinationRequest) -> Result<DestinationsReply, Status> {
        let actor = who.name.clone();
        validate(&r.name)?;
        // Known to the leader before anything is written (apply checks again).
        self.leader_redirect_if_follower()?;
        if self.state().read(|a| a.state.destination(&r.name).is_none()) {
            return Err(Status::not_found(format!("no destination `{}`; `fleetctl destinations` lists them", r.name)));
        }
        let id = self.scoped(&actor, &r.request_id);
        let (outcome, index) = self.propose(who, id, Command::RemoveDestination { name: r.name.clone() }).await?;
        match outcome {
            Outcome::Done => Ok(DestinationsReply { destinations_json: vec![], applied_index: index }),
            Outcome::Rejected { reason } => Err(fleet_net::wire::rejected(format!("refused: {reason}"))),
            Outcome::NotFound { what } => Err(Status::not_found(format!("no {what}"))),
            Outcome::Invalid { reason } => Err(Status::invalid_argument(reason)),
            other => Err(Status::internal(format!("unexpected answer from the state machine: {other:?}"))),
        }
    }
}
