//! The destinations file (`fleetctl destinations apply -f`, and the
//! coordinator's `ApplyDestinations`): no panic; what is accepted has unique,
//! valid names and known adapters.
#![no_main]

use fleet_core::manifest::{parse_destinations, validate_destination};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(list) = parse_destinations("destinations.yaml", text) {
        let mut names = std::collections::BTreeSet::new();
        for d in &list {
            assert!(validate_destination(d).is_ok(), "an invalid destination was accepted: {d:?}");
            assert!(names.insert(d.name.clone()), "a destination was accepted twice: {}", d.name);
        }
    }
});
