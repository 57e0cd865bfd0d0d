//! The leader's rule for a paused canary (see `deploy::canary`).

use super::{Action, Observed, Proposal, StepKey, Tick, LEADER_ACTOR};
use crate::command::Command;
use crate::deploy::{DeployState, Deployment, ErrorClass, StepOutcome};

/// The leader's canary rule for `d` (checked after the lease, lock-wait,
/// deadline and cancel rules, before sending work): a paused deployment
/// without analysis whose pause passed is promoted; one whose promote was
/// requested while its analysis runs gets the analysis aborted (or, when
/// it was never sent and its node is connected, recorded as promoted).
/// `None`: nothing canary-specific is due (the analysis step is then sent
/// like any step).
pub fn due(d: &Deployment, tick: Tick, seen: &impl Observed) -> Option<Option<Action>> {
    if d.state != DeployState::Paused {
        return None;
    }
    let p = d.pause.as_ref()?;
    let s = d.steps.get(p.step)?;
    if !s.plan.action.is_sent_pause() {
        let expired = p.until_ms.is_some_and(|u| tick.now_ms >= u);
        return Some(expired.then(|| {
            Action::Propose(Proposal {
                key: format!("{}/promote", d.id),
                request_id: Some(format!("{LEADER_ACTOR}/promote/{}", d.id)),
                command: Command::PromoteDeployment { id: d.id.clone(), actor: LEADER_ACTOR.into() },
            })
        }));
    }
    p.promote_requested_by.as_ref()?;
    let key =
        StepKey { deployment: d.id.clone(), step: p.step, undo: false, attempt: s.attempt, token: d.token.unwrap_or(0), epoch: d.epoch };
    Some(match seen.in_flight(&key) {
        Some(f) if !f.aborted => Some(Action::Abort { node: f.node, key, reason: "the canary was promoted".into() }),
        Some(_) => None,
        None if seen.is_connected(&s.plan.node) => {
            let outcome = StepOutcome {
                step: p.step,
                undo: false,
                attempt: s.attempt,
                token: key.token,
                epoch: key.epoch,
                ok: false,
                output: None,
                error: Some("promoted before the analysis ran".into()),
                class: Some(ErrorClass::Aborted),
                started_ms: tick.now_ms,
                finished_ms: tick.now_ms,
                node: LEADER_ACTOR.into(),
            };
            Some(Action::Propose(Proposal {
                key: format!("{}/promote-unsent/{}", d.id, s.attempt),
                request_id: None,
                command: Command::StepResult { deployment: d.id.clone(), outcome },
            }))
        }
        None => None,
    })
}

#[cfg(test)]
mod tests;
