//! Heap held by a `State` filled with locks the way `fleet-bench catchup
//! --state-mb 20` fills a cluster (15 KiB reasons, one request id each, so
//! one dedup record each), after applying and after loading it back from
//! its stored pairs (a restart or a snapshot install).
//!
//! ```sh
//! cargo run --release -p fleet-core --example lock_heap -- [MB] [REASON_KIB]
//! ```
//!
//! Live bytes are counted by a wrapper around the system allocator, so the
//! figures are what the state holds, not what an allocator keeps besides.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use fleet_core::names::MAX_REASON_LEN;
use fleet_core::{Command, Request, State};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to `System` unchanged; only a counter is
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let (state_mb, reason_kib) = match (args.next().unwrap_or(Ok(20)), args.next().unwrap_or(Ok(15))) {
        (Ok(m), Ok(k)) if (1..=MAX_REASON_LEN / 1024).contains(&k) => (m, k),
        _ => {
            eprintln!("usage: lock_heap [MB of reasons, default 20] [reason KiB 1..={}, default 15]", MAX_REASON_LEN / 1024);
            std::process::exit(2);
        }
    };
    let reason_bytes = reason_kib * 1024;
    let locks = (state_mb * 1_000_000).div_ceil(reason_bytes);

    let start = LIVE.load(Relaxed);
    let mut state = State::default();
    for i in 0..locks {
        let reason = (0..reason_bytes).map(|j| char::from(b'a' + ((i * 7 + j * 13) % 26) as u8)).collect();
        let command = Command::AcquireLock { destination: format!("dest-{i}"), holder: "bench".into(), reason };
        let request = Request { request_id: Some(format!("fill-{i}")), at_ms: 1, command, origin: None };
        state.apply(i as u64 + 1, &request);
    }
    let applied = LIVE.load(Relaxed) - start;

    let pairs = state.dump();
    drop(state);
    let loaded = match State::load(pairs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("the dumped state did not load back: {e}");
            std::process::exit(1);
        }
    };
    let after_load = LIVE.load(Relaxed) - start;
    println!(
        "{locks} locks, {reason_kib} KiB reasons ({:.1} MB of reasons): heap {:.1} MB after applying, {:.1} MB after loading",
        mb(locks * reason_bytes),
        mb(applied),
        mb(after_load)
    );
    drop(loaded);
}
