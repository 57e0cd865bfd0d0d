//! Raft log entries as a replica reads them back (from its disk or from a
//! peer): one JSON `Request` per line. Decoding never panics, `State::apply`
//! is total on whatever decodes, and the state rebuilt from its snapshot or
//! from the persisted changes equals the state itself.
#![no_main]

use fleet_core::{Request, State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut state = State::default();
    let mut kv: std::collections::BTreeMap<String, Vec<u8>> = state.dump().into_iter().collect();
    for (i, line) in data.split(|&b| b == b'\n').enumerate().take(64) {
        let Ok(req) = serde_json::from_slice::<Request>(line) else { continue };
        let (_, changes) = state.apply(i as u64 + 1, &req);
        for c in changes {
            match c.value {
                Some(v) => kv.insert(c.key, v),
                None => kv.remove(&c.key),
            };
        }
    }
    let from_snapshot = State::load(state.dump()).expect("a snapshot loads");
    assert_eq!(from_snapshot, state, "the state rebuilt from a snapshot differs");
    let from_changes = State::load(kv).expect("persisted changes load");
    assert_eq!(from_changes, state, "the state rebuilt from the persisted changes differs");
});
