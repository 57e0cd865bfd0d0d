//! Checks shared by the failure tests: the witness invariants, the
//! instances a deployment started, the wall clock.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{ensure, Context as _};
use serde_json::Value;

use crate::values::{kind, steps};

/// Milliseconds since the epoch (to compare with event and witness times).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}


/// Invariant 1 and fencing, over every witness line there is: on each
/// destination no two actions overlapped in time, no action carried a
/// token lower than one already used there, and no step attempt (or
/// undo attempt) was carried out twice.
pub fn assert_witness_safe(witness: &[Value]) -> anyhow::Result<()> {
    let mut by_dest: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for l in witness {
        by_dest.entry(l["destination"].as_str().unwrap_or("?").to_string()).or_default().push(l);
    }
    for (dest, mut lines) in by_dest {
        lines.sort_by_key(|l| (l["start_ms"].as_i64().unwrap_or(0), l["end_ms"].as_i64().unwrap_or(0)));
        for w in lines.windows(2) {
            let (a, b) = (w[0], w[1]);
            ensure!(a["end_ms"].as_i64() <= b["start_ms"].as_i64(), "two actions overlapped on destination {dest}:\n  {a}\n  {b}");
            ensure!(
                a["token"].as_u64() <= b["token"].as_u64(),
                "an action with a lower token ran after a higher one on destination {dest}:\n  {a}\n  {b}"
            );
        }
    }
    let mut seen = BTreeSet::new();
    for l in witness {
        let key = (l["deployment"].to_string(), l["step"].to_string(), l["undo"].to_string(), l["attempt"].to_string());
        ensure!(seen.insert(key), "a step attempt was carried out twice: {l}");
    }
    Ok(())
}

/// (node, pid) of the instance a deployment started on each node.
pub fn instances(d: &Value) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out = vec![];
    for s in steps(d).iter().filter(|s| kind(s) == "start_instance") {
        let text = s["output"].as_str().with_context(|| format!("start step without output: {s}"))?;
        let o: Value = serde_json::from_str(text)?;
        let pid = o["pid"].as_u64().with_context(|| format!("start output without pid: {o}"))? as u32;
        out.push((s["node"].as_str().unwrap_or("?").to_string(), pid));
    }
    Ok(out)
}
