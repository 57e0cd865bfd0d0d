//! Separate hosts on one machine: every coordinator and node runs in a
//! network namespace of its own, so links between them can be cut the way
//! a real network fails.
//!
//! ```text
//!   root namespace (the test)            fleet-<pid>-<seq>-sw (the switch)
//!   flt<pid>x<seq> 10.77.K.254  ──veth──  uplink ─┐
//!                                                 br0 ── h1 ──veth── eth0 10.77.K.1  fleet-<pid>-<seq>-c1
//!                                                     ── h2 ──veth── eth0 10.77.K.2  fleet-<pid>-<seq>-c2
//!                                                     ── ...
//! ```
//!
//! The bridge lives in a namespace of its own: the root namespace of a
//! machine with Docker drops bridged traffic (`FORWARD` policy `DROP` with
//! `br_netfilter`), and the tests change nothing in the root namespace but
//! one veth with the gateway address. `K` is a free /24 claimed per
//! topology, so topologies of parallel tests do not collide.
//!
//! Faults are iptables `DROP` rules inside the hosts' namespaces ([`Cut`]):
//! a host isolated from others (both directions), a one-way cut (a host's
//! packets to another dropped, the other's still delivered), and flapping
//! ([`Flap`]: a cut applied and healed on a schedule). The test process
//! reaches every host through the gateway; cuts never involve it unless
//! asked.
//!
//! Everything is removed on drop; a run that was killed leaves namespaces
//! and links named after its pid, which the next [`Topology::new`] removes
//! ([`cleanup_leftovers`]).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use fleet_proto::{AddLearnerRequest, PromoteRequest};
use fleetctl::dev;

use crate::harness::{install_crypto, pid_alive, Cluster, Fleet, Node, TestSlot};

/// Namespaces of every topology start with this (then `<pid>-<seq>-`).
const NS_PREFIX: &str = "fleet-";
/// The root namespace's end of the uplink: `flt<pid>x<seq>` (at most 15
/// bytes, the kernel's limit for interface names).
const LINK_PREFIX: &str = "flt";

/// Why these tests cannot run here, if they cannot: they need root, `ip
/// netns` and iptables.
pub fn skip_reason() -> Option<String> {
    // Once per process: the tests of one binary run in parallel, and a
    // probe per test would race on its name.
    static REASON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REASON.get_or_init(probe_reason).clone()
}

fn probe_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Some("network namespaces need root; run the partition tests as root".into());
    }
    let probe = format!("{NS_PREFIX}probe-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    if let Err(e) = run("ip", &["netns", "add", &probe]) {
        return Some(format!("`ip netns` does not work here ({e:#})"));
    }
    let iptables = run("ip", &["netns", "exec", &probe, "iptables", "-w", "-L", "OUTPUT"]);
    let _ = run("ip", &["netns", "del", &probe]);
    if let Err(e) = iptables {
        return Some(format!("iptables does not work in a network namespace ({e:#})"));
    }
    None
}

/// One host: a network namespace with one address on the topology's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A bridge and one namespace per host; removed on drop.
pub struct Topology {
    switch_ns: String,
    uplink: String,
    subnet: u8,
    hosts: Vec<Host>,
    claim: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);
static SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Topology {
    /// Hosts named `hosts` (`c1`, `n1` ...), addresses `10.77.K.1`,
    /// `10.77.K.2` ... in that order; the test reaches them through
    /// `10.77.K.254`.
    pub fn new(hosts: &[&str]) -> anyhow::Result<Topology> {
        anyhow::ensure!(!hosts.is_empty() && hosts.len() < 250, "a topology has 1 to 249 hosts");
        let _one_at_a_time = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        cleanup_leftovers();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let (subnet, claim) = claim_subnet()?;
        let tag = format!("{pid}-{seq}");
        let topo = Topology {
            switch_ns: format!("{NS_PREFIX}{tag}-sw"),
            uplink: format!("{LINK_PREFIX}{pid}x{seq}"),
            subnet,
            hosts: hosts
                .iter()
                .enumerate()
                .map(|(i, h)| Host {
                    name: h.to_string(),
                    ns: format!("{NS_PREFIX}{tag}-{h}"),
                    ip: Ipv4Addr::new(10, 77, subnet, i as u8 + 1),
                })
                .collect(),
            claim,
        };
        // On an error, drop removes what was made.
        topo.build().with_context(|| format!("building the network topology 10.77.{subnet}.0/24"))?;
        Ok(topo)
    }

    fn build(&self) -> anyhow::Result<()> {
        let sw = self.switch_ns.clone();
        run("ip", &["netns", "add", &sw])?;
        run("ip", &["-n", &sw, "link", "set", "dev", "lo", "up"])?;
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "dev", "br0", "up"])?;
        run("ip", &["link", "add", &self.uplink, "type", "veth", "peer", "name", "uplink", "netns", &sw])?;
        run("ip", &["-n", &sw, "link", "set", "dev", "uplink", "master", "br0"])?;
        run("ip", &["-n", &sw, "link", "set", "dev", "uplink", "up"])?;
        run("ip", &["addr", "add", &format!("{}/24", self.gateway()), "dev", &self.uplink])?;
        run("ip", &["link", "set", "dev", &self.uplink, "up"])?;
        for (i, h) in self.hosts.iter().enumerate() {
            let port = format!("h{}", i + 1);
            run("ip", &["netns", "add", &h.ns])?;
            run("ip", &["-n", &h.ns, "link", "set", "dev", "lo", "up"])?;
            run("ip", &["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &h.ns])?;
            run("ip", &["-n", &sw, "link", "set", "dev", &port, "master", "br0"])?;
            run("ip", &["-n", &sw, "link", "set", "dev", &port, "up"])?;
            run("ip", &["-n", &h.ns, "addr", "add", &format!("{}/24", h.ip), "dev", "eth0"])?;
            run("ip", &["-n", &h.ns, "link", "set", "dev", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The test's own address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts.iter().find(|h| h.name == name).with_context(|| format!("no host {name} in this topology"))
    }

    pub fn ip(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        Ok(self.host(name)?.ip)
    }

    /// The command prefix that runs a program on host `name`.
    pub fn exec_prefix(&self, name: &str) -> anyhow::Result<Vec<OsString>> {
        Ok(["ip", "netns", "exec", &self.host(name)?.ns].iter().map(OsString::from).collect())
    }

    /// Rules that drop everything between `name` and each of `peers`, both
    /// ways (in `name`'s namespace). The gateway (the test) still reaches it.
    pub fn isolation(&self, name: &str, peers: &[&str]) -> anyhow::Result<Vec<Rule>> {
        let ns = self.host(name)?.ns.clone();
        let mut rules = vec![];
        for p in peers {
            let ip = self.ip(p)?;
            rules.push(Rule { ns: ns.clone(), chain: "OUTPUT", dir: "-d", ip });
            rules.push(Rule { ns: ns.clone(), chain: "INPUT", dir: "-s", ip });
        }
        Ok(rules)
    }

    /// Rules that drop what `from` sends to `to`; what `to` sends to
    /// `from` is still delivered (TCP then delivers `to`'s data but loses
    /// `from`'s answers and acknowledgements).
    pub fn one_way(&self, from: &str, to: &str) -> anyhow::Result<Vec<Rule>> {
        Ok(vec![Rule { ns: self.host(from)?.ns.clone(), chain: "OUTPUT", dir: "-d", ip: self.ip(to)? }])
    }

    /// Isolate `name` from each of `peers` now.
    pub fn isolate(&self, name: &str, peers: &[&str]) -> anyhow::Result<Cut> {
        Cut::apply(self.isolation(name, peers)?)
    }

    /// Cut `from` → `to` now.
    pub fn cut_one_way(&self, from: &str, to: &str) -> anyhow::Result<Cut> {
        Cut::apply(self.one_way(from, to)?)
    }

    /// Apply `rules` for `cut_for`, heal for `heal_for`, again and again
    /// until the [`Flap`] is stopped or dropped.
    pub fn flap(&self, rules: Vec<Rule>, cut_for: Duration, heal_for: Duration) -> Flap {
        Flap::start(rules, cut_for, heal_for)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // A namespace goes away with its last process; its veth ends go
        // with it and take their peers along. The switch goes last.
        for h in &self.hosts {
            let _ = run("ip", &["netns", "del", &h.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.switch_ns]);
        if link_exists(&self.uplink) {
            let _ = run("ip", &["link", "del", &self.uplink]);
        }
        let _ = std::fs::remove_file(&self.claim);
    }
}

/// One iptables `DROP` rule in a host's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    ns: String,
    chain: &'static str,
    /// `-s` (from) or `-d` (to).
    dir: &'static str,
    ip: Ipv4Addr,
}

impl Rule {
    fn iptables(&self, op: &str) -> anyhow::Result<()> {
        let ip = self.ip.to_string();
        run("ip", &["netns", "exec", &self.ns, "iptables", "-w", op, self.chain, self.dir, &ip, "-j", "DROP"])
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {} {} DROP", self.ns, self.chain, self.dir, self.ip)
    }
}

fn apply_all(rules: &[Rule]) -> anyhow::Result<()> {
    for r in rules {
        r.iptables("-A").with_context(|| format!("adding {r}"))?;
    }
    Ok(())
}

fn remove_all(rules: &[Rule]) -> anyhow::Result<()> {
    let mut first_error = None;
    for r in rules {
        if let Err(e) = r.iptables("-D") {
            first_error.get_or_insert(e.context(format!("removing {r}")));
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Rules in force until [`Cut::heal`] (or drop).
pub struct Cut {
    rules: Vec<Rule>,
    active: bool,
}

impl Cut {
    fn apply(rules: Vec<Rule>) -> anyhow::Result<Cut> {
        let cut = Cut { rules, active: true };
        apply_all(&cut.rules)?;
        Ok(cut)
    }

    pub fn heal(mut self) -> anyhow::Result<()> {
        self.active = false;
        remove_all(&self.rules)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        if self.active {
            let _ = remove_all(&self.rules);
        }
    }
}

/// A link that fails and recovers on a schedule, in a thread of its own.
pub struct Flap {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<u32>>>,
}

impl Flap {
    fn start(rules: Vec<Rule>, cut_for: Duration, heal_for: Duration) -> Flap {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut cycles = 0u32;
            loop {
                apply_all(&rules)?;
                cycles += 1;
                // The timed intervals are the fault itself, not a wait for
                // a condition; a stop ends them at once.
                let stop_now = !matches!(stopped.recv_timeout(cut_for), Err(mpsc::RecvTimeoutError::Timeout));
                remove_all(&rules)?;
                if stop_now || !matches!(stopped.recv_timeout(heal_for), Err(mpsc::RecvTimeoutError::Timeout)) {
                    return Ok(cycles);
                }
            }
        });
        Flap { stop: Some(stop), thread: Some(thread) }
    }

    /// Stop flapping with the link healed; answers how many times it was cut.
    pub fn stop(mut self) -> anyhow::Result<u32> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> anyhow::Result<u32> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the flapping thread panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for Flap {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

// ----------------------------------------------------------- processes

/// Start coordinators on `hosts` (ids 1, 2, ... in that order), listening
/// on their host's address with an OS-assigned port and joined as voters.
/// Their certificate names every host's address, as TLS checks the host
/// of the address dialled.
pub async fn start_cluster(topo: &Topology, hosts: &[&str], extra_args: &[&str]) -> anyhow::Result<Cluster> {
    install_crypto();
    let keep = std::env::var_os("FLEET_KEEP_TEST_DIR").is_some();
    let dir = tempfile::Builder::new().prefix("fleet-netns-test-").disable_cleanup(keep).tempdir()?;
    let certs = dir.path().join("certs");
    fleetctl::certs::init(&certs, false)?;
    let sans: Vec<String> = topo.hosts().iter().map(|h| h.ip.to_string()).collect();
    fleetctl::certs::issue(&certs, fleet_core::auth::Role::Coordinator, "coordinator", &sans, &certs)?;
    let mut cluster = Cluster {
        bin: dev::find_binary("fleet-coord")?,
        ctl: dev::find_binary("fleetctl")?,
        dir,
        coords: Default::default(),
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
    };
    for (i, host) in hosts.iter().enumerate() {
        let id = i as u64 + 1;
        spawn_coordinator(topo, &mut cluster, id, host)?;
        if id == 1 {
            continue;
        }
        let addr = cluster.coords[&id].addr.clone();
        let mut c = cluster.client("operator")?;
        c.call_with_timeout(Duration::from_secs(120), |mut cl, _| {
            let req = AddLearnerRequest { id, addr: addr.clone() };
            async move { cl.add_learner(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        c.call(|mut cl, _| async move { cl.promote(PromoteRequest { id }).await.map(|r| r.into_inner()) }).await?;
    }
    Ok(cluster)
}

/// `fleet-coord` on `host` (under `ip netns exec`), listening on the host's
/// address; a restart puts it there again.
fn spawn_coordinator(topo: &Topology, cluster: &mut Cluster, id: u64, host: &str) -> anyhow::Result<()> {
    let listen = format!("{}:0", topo.ip(host)?);
    cluster.spawn_under(topo.exec_prefix(host)?, id, id == 1, &listen).with_context(|| format!("coordinator {id} on host {host}"))
}

/// A [`Fleet`] whose coordinators and nodes are hosts of a [`Topology`].
/// Fields drop in order: the processes go before their namespaces.
pub struct NetFleet {
    pub fleet: Fleet,
    pub topo: Topology,
}

/// A node: its name, the host it runs on, its labels.
pub type NodeOnHost<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

impl NetFleet {
    /// Hosts `coord_hosts` (coordinators 1, 2, ...) and the nodes' hosts,
    /// then `destinations_yaml`; returns when every node is connected.
    pub async fn start(coord_hosts: &[&str], nodes: &[NodeOnHost<'_>], destinations_yaml: &str) -> anyhow::Result<NetFleet> {
        let slot = TestSlot::take();
        let mut names: Vec<&str> = coord_hosts.to_vec();
        names.extend(nodes.iter().map(|(_, host, _)| *host));
        let topo = Topology::new(&names)?;
        let cluster = start_cluster(&topo, coord_hosts, crate::harness::FAST_RAFT).await?;
        let mut started: Vec<Node> = vec![];
        for (name, host, labels) in nodes {
            started.push(cluster.start_node_wrapped(name, labels, &topo.exec_prefix(host)?)?);
        }
        let net = NetFleet { fleet: Fleet::assemble(slot, cluster, started), topo };
        let names: Vec<&str> = nodes.iter().map(|(n, _, _)| *n).collect();
        if let Err(e) = net.fleet.cluster.wait_nodes_connected(&names).await {
            eprintln!("{}", net.fleet.logs());
            return Err(e);
        }
        if !destinations_yaml.is_empty() {
            net.fleet.cluster.apply_destinations(destinations_yaml).await?;
        }
        Ok(net)
    }
}

// ------------------------------------------------------------ plumbing

/// Run a command; an error carries its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default()
}

fn link_exists(name: &str) -> bool {
    Path::new(&format!("/sys/class/net/{name}")).exists()
}

fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("fleet-netns")
}

/// A /24 under 10.77 that no other topology (of this or another test
/// process) uses and that no interface of the root namespace is in:
/// claimed with a file named after it, holding the claimer's pid.
fn claim_subnet() -> anyhow::Result<(u8, PathBuf)> {
    let dir = claims_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let in_use = output("ip", &["-o", "-4", "addr", "show"]);
    for k in 1..=250u8 {
        if in_use.contains(&format!(" 10.77.{k}.")) {
            continue;
        }
        let path = dir.join(format!("10.77.{k}"));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                use std::io::Write as _;
                f.write_all(std::process::id().to_string().as_bytes())?;
                return Ok((k, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("claiming {}", path.display())),
        }
    }
    bail!("no free /24 under 10.77.0.0/16 for a test topology; remove leftovers with `ip netns list` / `ip link` (names fleet-*, flt*)")
}

/// Remove what killed test runs left behind: namespaces `fleet-<pid>-...`,
/// uplinks `flt<pid>x...` and subnet claims of processes that are gone.
pub fn cleanup_leftovers() {
    let dead = |pid: &str| pid.parse::<u32>().is_ok_and(|p| !pid_alive(p));
    for line in output("ip", &["netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        if rest.split('-').next().is_some_and(dead) {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
    for line in output("ip", &["-o", "link", "show"]).lines() {
        // `7: flt1234x0@if6: <...`
        let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else { continue };
        let Some(rest) = name.strip_prefix(LINK_PREFIX) else { continue };
        if rest.split('x').next().is_some_and(dead) {
            let _ = run("ip", &["link", "del", name]);
        }
    }
    if let Ok(entries) = std::fs::read_dir(claims_dir()) {
        for e in entries.flatten() {
            let pid = std::fs::read_to_string(e.path()).unwrap_or_default();
            if dead(pid.trim()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl NetFleet {
    /// End a test like [`Fleet::finish`]; the namespaces go after the
    /// processes.
    pub fn finish(self, r: anyhow::Result<()>) {
        let NetFleet { fleet, topo } = self;
        fleet.finish(r);
        drop(topo);
    }
}
