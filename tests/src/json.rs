//! What `fleetctl -o json` prints, typed: fleetctl's own output types
//! (`fleetctl::output`, the types it serializes), so a field renamed on
//! either side no longer compiles or fails to parse, instead of reading as
//! absent. Deployments are fleet-core's own [`Deployment`].
//!
//! Also here: the few step outputs of the process adapter the tests read
//! (a JSON string inside a step record), each with only the fields a test
//! uses, all required.
//!
//! [`Deployment`]: fleet_core::deploy::Deployment

use serde::Deserialize;

pub use fleetctl::output::{
    ClusterStatusView, DestinationRecord, ErrorLine, HistoryEntry, Line, LockQueueView, LockReplyView, LockStatusView, LockView,
    MemberView, MembershipView, NodeRecord, Plan, ResultLine, StepEventStatus, Submitted, WatchEvent,
};

/// What the process adapter's `start_instance` step outputs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StartOutput {
    pub pid: u32,
    pub port: u16,
    pub release: String,
}

/// What the process adapter's `switch_route` step outputs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SwitchOutput {
    /// `127.0.0.1:P`, the app's stable address on the node.
    pub route: String,
}

#[cfg(test)]
mod tests {
    use fleet_core::deploy::DeployState;

    use super::*;

    #[test]
    fn lines_parse_by_type() {
        let sub = r#"{"type":"submitted","id":"d1","state":"queued","app":"web","release":"v1","destination":"dev","destinations":["dev"],"rollback_of":null}"#;
        let l: Line = serde_json::from_str(sub).unwrap();
        assert!(matches!(&l, Line::Submitted(s) if s.id == "d1" && s.state == DeployState::Queued));
        let step = r#"{"type":"step","id":"d1","step":3,"of":8,"name":"start","node":"n1","undo":true,"status":"undone","attempt":1,"error":null,"duration_ms":12}"#;
        let l: Line = serde_json::from_str(step).unwrap();
        assert!(matches!(&l, Line::Event(WatchEvent::Step { undo: true, status: StepEventStatus::Undone, step: 3, .. })));
        let err = r#"{"type":"error","exit_code":2,"error":"invalid_file","file":"f.yaml","field":"release","reason":"missing"}"#;
        let l: Line = serde_json::from_str(err).unwrap();
        assert!(matches!(&l, Line::Error(e) if e.exit_code == 2 && e.field.as_deref() == Some("release")));
        assert!(serde_json::from_str::<Line>(r#"{"type":"progress"}"#).is_err(), "an unknown line type");
    }

    #[test]
    fn step_outputs_need_their_fields() {
        let s: StartOutput = serde_json::from_str(r#"{"port":4000,"pid":12,"release":"v1"}"#).unwrap();
        assert_eq!((s.pid, s.port, s.release.as_str()), (12, 4000, "v1"));
        assert!(serde_json::from_str::<StartOutput>(r#"{"port":4000,"process":12,"release":"v1"}"#).is_err());
        let r: SwitchOutput = serde_json::from_str(r#"{"route":"127.0.0.1:4000","previous":null,"instance":{}}"#).unwrap();
        assert_eq!(r.route, "127.0.0.1:4000");
        assert!(serde_json::from_str::<SwitchOutput>(r#"{"address":"127.0.0.1:4000"}"#).is_err());
    }
}
