//! Choosing the port a new instance listens on.
//!
//! A new instance gets a port of the node's instance range (`fleet-node
//! --instance-ports`, by default 20000-32000, below Linux's usual ephemeral
//! range 32768-60999, so the node's own outgoing connections — health
//! probes, the proxy, gRPC — never hold one) that
//! * is not the port of an instance or route this node has recorded (a
//!   crashed active instance being restarted does not listen for a moment);
//! * was not handed to another start in the last [`HOLD`] (that start may
//!   not have recorded it yet: two destinations start at once);
//! * binds on 127.0.0.1 right now (no other process listens on it).
//!
//! The search goes up from where the last one stopped (from a random place
//! at first, so two nodes on one machine rarely try the same ports at the
//! same moment), so a port just given up is not handed out again soon.
//!
//! Before, a port came from binding port 0 and letting it go: with 100
//! destinations starting at once, another process took one of those ports in
//! between and the instance failed with "Address already in use". A process
//! outside Fleet can still take a port between the check and the instance's
//! own bind; `bluegreen::start` then starts the instance again on another
//! port.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, TcpListener};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::adapter::StepError;

/// How long a handed-out port stays reserved for the start that got it.
pub const HOLD: Duration = Duration::from_secs(60);

/// An inclusive range of TCP ports, written `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// The default instance range (Nomad's dynamic port range too).
    pub const DEFAULT: PortRange = PortRange { first: 20000, last: 32000 };

    fn len(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// The `i`-th port after `from`, wrapping around inside the range.
    fn nth_from(self, from: u16, i: u32) -> u16 {
        let offset = (u32::from(from.clamp(self.first, self.last)) - u32::from(self.first) + i) % self.len();
        (u32::from(self.first) + offset) as u16
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port range; write FIRST-LAST, e.g. 20000-32000");
        let (first, last) = s.trim().split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(format!("`{s}`: the first port must be at least 1 and not above the last"));
        }
        Ok(PortRange { first, last })
    }
}

/// The first port of `range`, going up from `from` and wrapping around,
/// that `usable` accepts. Pure: the decision without sockets.
pub fn pick(range: PortRange, from: u16, mut usable: impl FnMut(u16) -> bool) -> Option<u16> {
    (0..range.len()).map(|i| range.nth_from(from, i)).find(|&p| usable(p))
}

/// Whether nothing listens on 127.0.0.1:`port` (or on every address) now.
pub fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Does an instance's log say that its port was in use? (What the OS
/// reports for `EADDRINUSE`, as Rust, Go, Python and Node print it.)
pub fn says_port_in_use(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use") || log.contains("eaddrinuse")
}

/// The node's instance ports: what was handed out lately, and where the
/// next search starts.
#[derive(Debug)]
pub struct Ports {
    range: PortRange,
    state: Mutex<Handed>,
}

#[derive(Debug)]
struct Handed {
    next: u16,
    at: HashMap<u16, Instant>,
}

impl Ports {
    pub fn new(range: PortRange) -> Ports {
        let next = range.nth_from(range.first, rand::random_range(0..range.len()));
        Ports { range, state: Mutex::new(Handed { next, at: HashMap::new() }) }
    }

    /// A port for a new instance, reserved for [`HOLD`]; `recorded` are the
    /// ports of the instances and routes this node has recorded.
    pub fn take(&self, recorded: &HashSet<u16>) -> Result<u16, StepError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        st.at.retain(|_, at| now.duration_since(*at) < HOLD);
        let from = st.next;
        let port = pick(self.range, from, |p| !recorded.contains(&p) && !st.at.contains_key(&p) && bindable(p)).ok_or_else(|| {
            StepError::resource(format!(
                "no free port for a new instance in this node's instance range {} ({} recorded by this node's apps, {} handed to starts in the last {}s, the rest in use by other processes); stop old releases, or give fleet-node a wider --instance-ports",
                self.range,
                recorded.iter().filter(|p| (self.range.first..=self.range.last).contains(*p)).count(),
                st.at.len(),
                HOLD.as_secs(),
            ))
        })?;
        st.at.insert(port, now);
        st.next = self.range.nth_from(port, 1);
        Ok(port)
    }
}

/// Linux's ephemeral port range (where outgoing connections get their
/// local port), if it can be read.
pub fn ephemeral_range() -> Option<PortRange> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some(PortRange { first: it.next()??, last: it.next()?? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn a_log_that_says_the_port_was_in_use_is_recognised() {
        let cases = [
            ("Rust", "fleet-demo-app: cannot listen on 127.0.0.1:28049: Address already in use (os error 98)", true),
            ("Go", "listen tcp 127.0.0.1:8080: bind: address already in use", true),
            ("Node", "Error: listen EADDRINUSE: address already in use :::3000", true),
            ("another failure", "panic: config file not found", false),
            ("empty log", "", false),
        ];
        for (what, log, expected) in cases {
            assert_eq!(says_port_in_use(log), expected, "{what}: {log}");
        }
    }

    #[test]
    fn pick_goes_up_from_where_it_was_and_wraps_around() {
        // (what, range, where the search starts, ports taken, the pick)
        type Case = (&'static str, PortRange, u16, &'static [u16], Option<u16>);
        let cases: &[Case] = &[
            ("the start itself", r(100, 105), 102, &[], Some(102)),
            ("skips taken ports", r(100, 105), 102, &[102, 103], Some(104)),
            ("wraps to the first", r(100, 105), 104, &[104, 105], Some(100)),
            ("a start outside the range is clamped", r(100, 105), 7, &[], Some(100)),
            ("a start above the range is clamped", r(100, 105), 900, &[105], Some(100)),
            ("every port taken", r(100, 102), 101, &[100, 101, 102], None),
            ("a range of one port", r(100, 100), 100, &[], Some(100)),
            ("the top of the port space", r(65534, 65535), 65535, &[65535], Some(65534)),
        ];
        for (what, range, from, taken, want) in cases {
            assert_eq!(pick(*range, *from, |p| !taken.contains(&p)), *want, "{what}");
        }
    }

    #[test]
    fn pick_tries_each_port_once() {
        let mut tried = Vec::new();
        assert_eq!(
            pick(r(10, 14), 12, |p| {
                tried.push(p);
                false
            }),
            None
        );
        assert_eq!(tried, [12, 13, 14, 10, 11]);
    }

    #[test]
    fn ranges_parse_and_say_what_is_wrong() {
        assert_eq!("20000-32000".parse::<PortRange>(), Ok(r(20000, 32000)));
        assert_eq!(" 5 - 5 ".parse::<PortRange>(), Ok(r(5, 5)));
        for bad in ["20000", "a-b", "0-10", "10-5", "1-70000", ""] {
            let err = bad.parse::<PortRange>().unwrap_err();
            assert!(err.contains(bad.trim()), "{bad}: {err}");
        }
        assert_eq!(PortRange::DEFAULT.to_string(), "20000-32000");
        assert!(r(1, 10).overlaps(r(10, 20)) && r(10, 20).overlaps(r(1, 10)) && r(5, 6).overlaps(r(1, 10)));
        assert!(!r(1, 9).overlaps(r(10, 20)) && !r(21, 30).overlaps(r(10, 20)));
    }

    /// A listener the test holds on a port of the range.
    fn held() -> (TcpListener, u16) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a test listener");
        let port = l.local_addr().expect("its address").port();
        (l, port)
    }

    #[test]
    fn a_port_another_process_listens_on_is_not_handed_out() {
        let (_listener, port) = held();
        let ports = Ports::new(r(port, port));
        let err = ports.take(&HashSet::new()).unwrap_err();
        assert_eq!(err.class, fleet_core::deploy::ErrorClass::Resource);
        assert!(
            err.message.contains(&format!("instance range {port}-{port}")) && err.message.contains("--instance-ports"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_handed_out_port_is_held_until_recorded_and_a_recorded_one_is_never_handed_out() {
        let (listener, port) = held();
        drop(listener);
        let ports = Ports::new(r(port, port));
        assert_eq!(ports.take(&HashSet::new()).expect("the free port"), port);
        // Not bound yet by its instance, but handed out: a second start
        // at the same moment must not get it.
        assert!(bindable(port));
        let err = ports.take(&HashSet::new()).unwrap_err();
        assert!(err.message.contains("1 handed to starts"), "{}", err.message);

        let fresh = Ports::new(r(port, port));
        let err = fresh.take(&HashSet::from([port])).unwrap_err();
        assert!(err.message.contains("1 recorded by this node's apps"), "{}", err.message);
    }

    #[test]
    fn concurrent_takes_get_distinct_ports() {
        let ports = std::sync::Arc::new(Ports::new(PortRange::DEFAULT));
        let got: Vec<u16> = (0..16)
            .map(|_| {
                let ports = ports.clone();
                std::thread::spawn(move || (0..8).map(|_| ports.take(&HashSet::new()).expect("a free port")).collect::<Vec<_>>())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().expect("a taker"))
            .collect();
        let distinct: HashSet<u16> = got.iter().copied().collect();
        assert_eq!(distinct.len(), got.len(), "{got:?}");
        assert!(got.iter().all(|p| (20000..=32000).contains(p)), "{got:?}");
    }
}
