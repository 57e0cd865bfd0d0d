//! `fleet.yaml` as any client may send it (fleetctl parses it locally; the
//! coordinator parses the same text that `SubmitDeployment` carries): no
//! panic, and whatever is accepted is within the size and nesting bounds and
//! survives its own validation again.
#![no_main]

use fleet_core::manifest::{check_bounds, parse_manifest, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let overrides = Overrides::default();
    if let Ok(spec) = parse_manifest("fleet.yaml", text, &overrides) {
        assert!(check_bounds(text).is_ok(), "a manifest beyond the bounds was accepted");
        // What the coordinator stores is JSON of the validated spec: it must
        // encode and decode to the same value (a replica loads it back).
        let json = serde_json::to_vec(&spec).expect("a validated spec encodes");
        let back: fleet_core::manifest::Spec = serde_json::from_slice(&json).expect("a stored spec decodes");
        assert_eq!(back, spec, "a stored spec changed on the way back");
    }
});
