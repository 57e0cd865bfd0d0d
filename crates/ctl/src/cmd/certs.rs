//! `certs init|issue`: the cluster CA and certificates.

use fleet_core::auth::Role;
use fleetctl::output::CertsWritten;
use fleetctl::{certs, exit};

use super::common::{print_json, usage, Exit};
use crate::cli::{CertsCmd, Output};

pub fn certs(cmd: CertsCmd, out: Output) -> Result<i32, Exit> {
    let written = match cmd {
        CertsCmd::Init { out: dir, force } => certs::init(&dir, force).map_err(usage)?,
        CertsCmd::Issue { role, name, ca_dir, out: dir, san } => {
            let role: Role = role.parse().map_err(usage)?;
            let dir = dir.unwrap_or_else(|| ca_dir.clone());
            let (c, k) = certs::issue(&ca_dir, role, &name, &san, &dir).map_err(usage)?;
            vec![c, k]
        }
    };
    match out {
        Output::Json => print_json(&CertsWritten { written }),
        Output::Text => {
            for p in &written {
                println!("wrote {}", p.display());
            }
        }
    }
    Ok(exit::OK)
}
