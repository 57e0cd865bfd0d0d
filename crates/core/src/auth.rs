//! Roles carried in client certificates and what each may call.
//!
//! The role is the certificate subject's organizational unit (OU); the
//! holder name is its common name (CN). Both are signed by the cluster CA,
//! so a caller cannot choose them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A coordinator: Raft traffic between coordinators.
    Coordinator,
    /// A worker node: the work stream to the leader.
    Node,
    /// A person or CI job that changes things: deploy, cancel, lock, membership.
    Operator,
    /// Read-only: status, history, lock status.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Coordinator, Role::Node, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}`; use one of coordinator, node, operator, viewer")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Raft RPCs between coordinators.
    Peer,
    /// Reads of cluster state.
    Read,
    /// Anything that changes cluster state on a user's behalf.
    Write,
    /// A worker node's work stream.
    Work,
}

/// May `role` make a call that needs `access`?
pub fn allows(role: Role, access: Access) -> bool {
    matches!(
        (role, access),
        (Role::Coordinator, Access::Peer)
            | (Role::Node, Access::Work)
            | (Role::Operator, Access::Read | Access::Write)
            | (Role::Viewer, Access::Read)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_table() {
        use Access::*;
        use Role::*;
        let table = [
            (Coordinator, [true, false, false, false]),
            (Node, [false, false, false, true]),
            (Operator, [false, true, true, false]),
            (Viewer, [false, true, false, false]),
        ];
        for (role, [peer, read, write, work]) in table {
            assert_eq!(allows(role, Work), work, "{role} work");
            assert_eq!(allows(role, Peer), peer, "{role} peer");
            assert_eq!(allows(role, Read), read, "{role} read");
            assert_eq!(allows(role, Write), write, "{role} write");
        }
    }

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("admin".parse::<Role>().unwrap_err().to_string().contains("use one of"));
    }
}
