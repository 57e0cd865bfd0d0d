//! The parts of the wire contract that are not messages: metadata keys and
//! the structured detail attached to error statuses.

use fleet_core::deploy::ErrorClass;
use fleet_proto::{ErrorCode, ErrorDetail};
use prost::Message;
use tonic::{Code, Status};

/// A follower answers `UNAVAILABLE` with the leader's address under this
/// metadata key; clients and nodes follow it.
pub const LEADER_METADATA: &str = "fleet-leader";

/// An error status carrying a machine-readable `code`.
pub fn status_with(code: Code, message: impl Into<String>, detail: ErrorCode) -> Status {
    let bytes = ErrorDetail { code: detail as i32 }.encode_to_vec();
    Status::with_details(code, message, bytes.into())
}

/// The destination is busy and its queue policy is `reject`.
pub fn rejected(message: impl Into<String>) -> Status {
    status_with(Code::FailedPrecondition, message, ErrorCode::Rejected)
}

/// The structured code of an error status, if it carries one this version knows.
pub fn detail_of(status: &Status) -> Option<ErrorCode> {
    if status.details().is_empty() {
        return None;
    }
    let detail = ErrorDetail::decode(status.details()).ok()?;
    ErrorCode::try_from(detail.code).ok().filter(|c| *c != ErrorCode::Unspecified)
}

/// The wire form of an error class.
pub fn class_to_wire(class: ErrorClass) -> fleet_proto::ErrorClass {
    use fleet_proto::ErrorClass as W;
    match class {
        ErrorClass::Transient => W::Transient,
        ErrorClass::Auth => W::Auth,
        ErrorClass::Resource => W::Resource,
        ErrorClass::Invalid => W::Invalid,
        ErrorClass::Aborted => W::Aborted,
    }
}

/// An error class read off the wire. Unset or unknown values are errors,
/// never silently some class: a newer node must not be misread.
pub fn class_from_wire(value: i32) -> Result<ErrorClass, UnknownClass> {
    use fleet_proto::ErrorClass as W;
    match W::try_from(value) {
        Ok(W::Transient) => Ok(ErrorClass::Transient),
        Ok(W::Auth) => Ok(ErrorClass::Auth),
        Ok(W::Resource) => Ok(ErrorClass::Resource),
        Ok(W::Invalid) => Ok(ErrorClass::Invalid),
        Ok(W::Aborted) => Ok(ErrorClass::Aborted),
        Ok(W::Unspecified) | Err(_) => Err(UnknownClass(value)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("error class {0} is unset or unknown to this coordinator; upgrade the coordinators before the nodes")]
pub struct UnknownClass(pub i32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_round_trips_and_unknown_values_are_errors() {
        for c in [ErrorClass::Transient, ErrorClass::Auth, ErrorClass::Resource, ErrorClass::Invalid, ErrorClass::Aborted] {
            assert_eq!(class_from_wire(class_to_wire(c) as i32), Ok(c));
        }
        assert_eq!(class_from_wire(0), Err(UnknownClass(0)));
        assert_eq!(class_from_wire(99), Err(UnknownClass(99)));
    }

    #[test]
    fn rejected_is_recognised_by_its_detail_not_its_message() {
        let s = rejected("destination web is busy");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(detail_of(&s), Some(ErrorCode::Rejected));
        // A message that merely looks like one is not a rejection.
        assert_eq!(detail_of(&Status::failed_precondition("rejected: no")), None);
        // Garbage details are ignored, not a panic.
        let junk = Status::with_details(Code::FailedPrecondition, "x", vec![0xff, 0xff, 0xff].into());
        assert_eq!(detail_of(&junk), None);
    }
}
