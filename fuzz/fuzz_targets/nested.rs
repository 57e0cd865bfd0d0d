//! The nesting bound in front of the YAML parser: deep structures are what
//! makes the parser slow, so this target builds them on purpose. Each input
//! byte picks an opener (flow `[`, `{`, block list `- `, block map
//! `k:\n  `); the rest is a tail. check_bounds must never panic, must refuse
//! anything deeper than the bound, and whatever it lets through must parse
//! (or be refused by the parser) without panicking.
#![no_main]

use fleet_core::manifest::{check_bounds, parse_manifest, Overrides, MAX_NESTING};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&depth, rest)) = data.split_first() else { return };
    if rest.is_empty() {
        return;
    }
    let depth = usize::from(depth) % (MAX_NESTING * 3);
    let mut text = String::from("app: ");
    let mut indent = 0usize;
    let mut closers = String::new();
    for (i, b) in rest.iter().cycle().take(depth).enumerate() {
        match b % 4 {
            0 => {
                text.push('[');
                closers.insert(0, ']');
            }
            1 => {
                text.push_str("{k: ");
                closers.insert(0, '}');
            }
            2 if closers.is_empty() => {
                indent += 2;
                text.push('\n');
                text.push_str(&" ".repeat(indent));
                text.push_str("- ");
            }
            _ if closers.is_empty() => {
                indent += 2;
                text.push_str(&format!("\n{}k{i}: ", " ".repeat(indent)));
            }
            _ => {
                text.push_str("[x, ");
                closers.insert(0, ']');
            }
        }
    }
    text.push('1');
    text.push_str(&closers);
    text.push('\n');
    if let Some(tail) = rest.get(depth.min(rest.len())..) {
        text.push_str(&String::from_utf8_lossy(tail));
    }
    let bounded = check_bounds(&text);
    let _ = parse_manifest("fleet.yaml", &text, &Overrides::default());
    if depth > MAX_NESTING {
        // Every opener adds a level (and `app:` is one): past the bound
        // some prefix is too deep, whatever the mix.
        assert!(bounded.is_err(), "{depth} openers passed the nesting bound");
    }
});
