//! Linearizability checker for histories of operations on ONE replicated lock.
//!
//! The algorithm is Wing & Gong's search with Lowe's memoization, as in
//! Porcupine. A configuration is (set of linearized operations as a bitset,
//! model state); from a configuration, any pending operation whose call
//! precedes the earliest pending return may be linearized next (calls sort
//! before returns at equal times, so operations that touch in time are
//! concurrent). The history is linearizable iff a configuration with every
//! operation linearized is reachable. Configurations are memoized on (bitset,
//! state) so each is expanded once.
//!
//! Unlike Porcupine, the configurations are explored level by level (level `n`
//! = every distinct configuration with `n` known-outcome operations
//! linearized) instead of depth-first with backtracking. Same search space and
//! memo, but the dominance pruning for unknown outcomes below is only exact
//! when all ways of reaching a configuration are compared at once. A
//! depth-first order was measured to re-explore whole suffixes of the history
//! and blow up when proving a violation in a history with a few dozen unknown
//! outcomes. The search is iterative and deterministic; its cost is linear in
//! the history length times the number of distinct configurations per level
//! (small with a few concurrent clients).
//!
//! Operations whose outcome is [`Outcome::Unknown`] get a return time of
//! +infinity: they may be linearized at any point after their invocation, with
//! whatever outcome is legal there, or never. The search succeeds once every
//! operation with a known outcome is linearized. Because such operations stay
//! pending forever, three reductions keep the search small, each justified
//! where it is implemented: only applications that make an otherwise illegal
//! known operation legal are tried (in blocks of at most two); operations of
//! the same kind and holder are interchangeable once invoked, so the earliest
//! unused one is taken; and a configuration that used at least as many
//! unknown operations of every class as another with the same bitset and state
//! is dropped. The tests compare the checker with a brute-force search over
//! every real-time-respecting order on thousands of random small histories.
//!
//! # Sequential specification
//!
//! State: `Option<(holder, token)>` plus the highest token granted so far.
//!
//! * `Acquire{holder}` → `Granted{token}`: the lock is free and `token` is
//!   strictly greater than every token granted before, or the lock is already
//!   held by `holder` with this very token (idempotent re-acquire).
//! * `Acquire{holder}` → `Held{by}`: held by `by`, and `by != holder`.
//! * `Release{holder}` → `Released`: held by `holder`; the lock becomes free.
//! * `Release{holder}` → `NotHeld`: the lock is free.
//! * `Release{holder}` → `NotOwner{by}`: held by `by`, and `by != holder`.
//!
//! An unknown-outcome acquire that takes effect on a free lock is granted a
//! token nobody observed. The checker keeps it symbolic: a lower bound
//! (one more than the highest token granted before). A later re-acquire by the
//! same holder that returns `Granted{token}` binds it; otherwise the smallest
//! value is assumed, which constrains later grants the least.

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

/// An operation on the lock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LockOp {
    Acquire { holder: String },
    Release { holder: String },
}

/// What the client observed as the result of an operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    Granted {
        token: u64,
    },
    Held {
        by: String,
    },
    Released,
    NotHeld,
    NotOwner {
        by: String,
    },
    /// The client does not know whether the operation took effect (timeout,
    /// server died, connection reset...).
    Unknown,
}

/// One completed (or abandoned) client operation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub client: usize,
    pub op: LockOp,
    pub outcome: Outcome,
    pub invoked_ns: u128,
    /// Ignored when `outcome` is [`Outcome::Unknown`].
    pub returned_ns: u128,
}

/// Why a history is not linearizable (or is malformed).
#[derive(Debug)]
pub struct Violation {
    /// Full human-readable explanation (what `Display` prints).
    pub message: String,
    /// Indices into the history of the longest linearizable prefix found by
    /// the search, in linearization order. Empty for malformed histories.
    pub longest_prefix: Vec<usize>,
    /// Indices into the history of the operations with a known outcome that
    /// could not be linearized after that prefix. The first one is the
    /// operation whose response was reached before it could be placed.
    pub unplaced: Vec<usize>,
    /// Number of operations with a known outcome in the history.
    pub known_ops: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Violation {}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Holding {
    holder: u32,
    /// The token, or its lower bound when `tentative`.
    token: u64,
    /// Granted by an unknown-outcome acquire: the exact token is unobserved
    /// and is at least `token`.
    tentative: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct LockState {
    held: Option<Holding>,
    /// Highest token granted so far (the lower bound for a tentative grant).
    max_token: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Acquire,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Granted(u64),
    Held(u32),
    Released,
    NotHeld,
    NotOwner(u32),
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    holder: u32,
    out: Out,
}

impl Op {
    fn known(&self) -> bool {
        self.out != Out::Unknown
    }
}

/// The sequential specification. Returns the state after `op` if `op` with
/// its outcome is legal in `state`. For unknown-outcome operations it returns
/// a state only when the operation would change the state: taking effect as a
/// no-op is indistinguishable from not taking effect, which the search models
/// by never linearizing the operation.
fn step(state: &LockState, op: &Op) -> Option<LockState> {
    let free = LockState { held: None, max_token: state.max_token };
    match (op.kind, op.out) {
        (Kind::Acquire, Out::Granted(t)) => match state.held {
            None if state.max_token.is_none_or(|m| t > m) => {
                Some(LockState { held: Some(Holding { holder: op.holder, token: t, tentative: false }), max_token: Some(t) })
            }
            None => None,
            Some(h) if h.holder == op.holder => {
                if h.tentative {
                    // Binds the unobserved token of an unknown-outcome grant.
                    (t >= h.token)
                        .then_some(LockState { held: Some(Holding { holder: op.holder, token: t, tentative: false }), max_token: Some(t) })
                } else {
                    (h.token == t).then_some(*state)
                }
            }
            Some(_) => None,
        },
        (Kind::Acquire, Out::Held(by)) => match state.held {
            Some(h) if h.holder == by && by != op.holder => Some(*state),
            _ => None,
        },
        (Kind::Acquire, Out::Unknown) => match state.held {
            None => {
                let lower = match state.max_token {
                    None => 0,
                    Some(m) => m.checked_add(1)?,
                };
                Some(LockState { held: Some(Holding { holder: op.holder, token: lower, tentative: true }), max_token: Some(lower) })
            }
            Some(_) => None, // would be a no-op (re-acquire or Held)
        },
        (Kind::Release, Out::Released) => match state.held {
            Some(h) if h.holder == op.holder => Some(free),
            _ => None,
        },
        (Kind::Release, Out::NotHeld) => state.held.is_none().then_some(*state),
        (Kind::Release, Out::NotOwner(by)) => match state.held {
            Some(h) if h.holder == by && by != op.holder => Some(*state),
            _ => None,
        },
        (Kind::Release, Out::Unknown) => match state.held {
            Some(h) if h.holder == op.holder => Some(free),
            _ => None, // would be a no-op (NotHeld or NotOwner)
        },
        // Outcomes of the other operation kind are rejected before the search.
        (Kind::Acquire, Out::Released | Out::NotHeld | Out::NotOwner(_)) | (Kind::Release, Out::Granted(_) | Out::Held(_)) => None,
    }
}

// ---------------------------------------------------------------------------
// Rendering helpers
// ---------------------------------------------------------------------------

fn describe(i: usize, e: &Event) -> String {
    let op = match &e.op {
        LockOp::Acquire { holder } => format!("Acquire({holder:?})"),
        LockOp::Release { holder } => format!("Release({holder:?})"),
    };
    let out = match &e.outcome {
        Outcome::Granted { token } => format!("Granted(token {token})"),
        Outcome::Held { by } => format!("Held(by {by:?})"),
        Outcome::Released => "Released".to_string(),
        Outcome::NotHeld => "NotHeld".to_string(),
        Outcome::NotOwner { by } => format!("NotOwner(by {by:?})"),
        Outcome::Unknown => "Unknown".to_string(),
    };
    let ret = if e.outcome == Outcome::Unknown { "?".to_string() } else { e.returned_ns.to_string() };
    format!("#{i} client {} {op} -> {out} [invoked {}, returned {ret}]", e.client, e.invoked_ns)
}

fn describe_state(state: &LockState, names: &[String]) -> String {
    let name = |id: u32| names.get(id as usize).map_or("?", String::as_str);
    let held = match state.held {
        None => "free".to_string(),
        Some(h) if h.tentative => {
            format!("held by {:?} with an unobserved token >= {} (granted by an unknown-outcome acquire)", name(h.holder), h.token)
        }
        Some(h) => format!("held by {:?} with token {}", name(h.holder), h.token),
    };
    match state.max_token {
        None => format!("{held}; no token granted yet"),
        Some(m) => format!("{held}; highest token granted so far {m}"),
    }
}

fn malformed(message: String, known_ops: usize) -> Violation {
    Violation { message: format!("malformed history: {message}"), longest_prefix: Vec::new(), unplaced: Vec::new(), known_ops }
}

// ---------------------------------------------------------------------------
// Checker
// ---------------------------------------------------------------------------

const NIL: usize = usize::MAX;

/// Operations with an unknown outcome, grouped into classes of the same kind
/// and holder, each sorted by invocation time.
///
/// Their return is at +infinity, so they never bound the search; one can be
/// placed once it was invoked no later than the earliest pending return of a
/// known operation. Two operations of one class that are both invoked are
/// interchangeable from then on, so the search only ever applies the
/// earliest-invoked unused operation of a class (if some linearization uses
/// `m` operations of a class, one exists that uses its first `m`). The
/// applied unknown operations are thus described by a count per class.
struct UnknownClasses {
    ops: Vec<Vec<usize>>,
    invoked: Vec<Vec<u128>>,
}

impl UnknownClasses {
    fn new(ops: &[Op], times: &[(u128, u128)]) -> Self {
        let mut class_of: HashMap<(Kind, u32), usize> = HashMap::new();
        let mut members: Vec<Vec<(u128, usize)>> = Vec::new();
        for (i, (op, &(inv, _))) in ops.iter().zip(times).enumerate() {
            if op.known() {
                continue;
            }
            let class = *class_of.entry((op.kind, op.holder)).or_insert_with(|| {
                members.push(Vec::new());
                members.len() - 1
            });
            members[class].push((inv, i));
        }
        let mut classes = UnknownClasses { ops: Vec::with_capacity(members.len()), invoked: Vec::with_capacity(members.len()) };
        for mut m in members {
            m.sort_unstable();
            classes.invoked.push(m.iter().map(|&(inv, _)| inv).collect());
            classes.ops.push(m.into_iter().map(|(_, i)| i).collect());
        }
        classes
    }

    /// The next unused operation of `class`, if it was invoked by `time`.
    fn candidate(&self, class: usize, used: &[u32], time: u128) -> Option<usize> {
        let next = used[class] as usize;
        let invoked = *self.invoked[class].get(next)?;
        (invoked <= time).then(|| self.ops[class][next])
    }
}

/// Static tables of the search.
struct Tables<'a> {
    ops: &'a [Op],
    times: &'a [(u128, u128)],
    /// Known operations sorted by (invocation, index) and (return, index).
    by_call: Vec<usize>,
    by_return: Vec<usize>,
    /// Bit index of each known operation (NIL for unknown ones).
    bit: Vec<usize>,
    /// Random key of each known operation: a set's hash is the XOR of its
    /// members' keys (Zobrist hashing), so a child's hash costs O(1).
    zobrist: Vec<u64>,
    unknown: UnknownClasses,
}

fn has_bit(bits: &[u64], index: usize) -> bool {
    bits[index / 64] & (1u64 << (index % 64)) != 0
}

/// Whether `set == base ∪ {index}` (with `index` not in `base`).
fn equals_with_bit(set: &[u64], base: &[u64], index: usize) -> bool {
    let (word, bit) = (index / 64, 1u64 << (index % 64));
    set.iter().zip(base).enumerate().all(|(w, (s, b))| *s == if w == word { b | bit } else { *b })
}

/// splitmix64: deterministic, well-mixed keys for Zobrist hashing.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn state_hash(state: &LockState) -> u64 {
    let mut hasher = DefaultHasher::new();
    state.hash(&mut hasher);
    hasher.finish()
}

/// How a configuration was reached: the previous configuration's trail and
/// the operations applied (up to two unknown-outcome ones, NIL when absent,
/// then the known one, always last).
struct Trail {
    parent: usize,
    steps: [usize; 3],
}

/// Configurations with the same set of linearized known operations and the
/// same model state, differing in which unknown-outcome operations were used.
/// Only an antichain is kept: using more unknown operations only removes
/// options (they could also have been dropped), so a configuration whose
/// per-class counts are all >= another's is dominated and discarded.
struct Group {
    known: Box<[u64]>,
    known_hash: u64,
    state: LockState,
    /// Every operation before these positions of `by_call` / `by_return` is
    /// linearized.
    call_pos: usize,
    ret_pos: usize,
    members: Vec<Member>,
}

struct Member {
    used: Box<[u32]>,
    trail: usize,
}

fn dominated_by(used: &[u32], other: &[u32]) -> bool {
    other.iter().zip(used).all(|(o, u)| o <= u)
}

/// One level of the search: all configurations with the same number of
/// linearized known operations, deduplicated (Lowe's memo).
#[derive(Default)]
struct Level {
    groups: Vec<Group>,
    index: HashMap<u64, Vec<usize>>,
}

impl Level {
    /// Adds the child of `parent` reached by `trail` (whose last step is the
    /// known operation linearized) in `state` with unknown counts `used`,
    /// unless it is dominated. `trails` receives `trail` when it is kept.
    fn add(&mut self, t: &Tables<'_>, parent: &Group, state: LockState, used: &[u32], trail: Trail, trails: &mut Vec<Trail>) {
        let bit = t.bit[trail.steps[2]];
        let known_hash = parent.known_hash ^ t.zobrist[bit];
        let key = known_hash ^ state_hash(&state);
        let bucket = self.index.entry(key).or_default();
        let found = bucket.iter().copied().find(|&g| {
            let group = &self.groups[g];
            group.state == state && group.known_hash == known_hash && equals_with_bit(&group.known, &parent.known, bit)
        });
        let group = match found {
            Some(g) => &mut self.groups[g],
            None => {
                let mut known = parent.known.clone();
                known[bit / 64] |= 1u64 << (bit % 64);
                let mut call_pos = parent.call_pos;
                while t.by_call.get(call_pos).is_some_and(|&o| has_bit(&known, t.bit[o])) {
                    call_pos += 1;
                }
                let mut ret_pos = parent.ret_pos;
                while t.by_return.get(ret_pos).is_some_and(|&o| has_bit(&known, t.bit[o])) {
                    ret_pos += 1;
                }
                bucket.push(self.groups.len());
                self.groups.push(Group { known, known_hash, state, call_pos, ret_pos, members: Vec::new() });
                let last = self.groups.len() - 1;
                &mut self.groups[last]
            }
        };
        if group.members.iter().any(|m| dominated_by(used, &m.used)) {
            return;
        }
        group.members.retain(|m| !dominated_by(&m.used, used));
        trails.push(trail);
        group.members.push(Member { used: used.into(), trail: trails.len() - 1 });
    }
}

/// Deepest point the search reached.
struct Best {
    prefix: Vec<usize>,
    state: LockState,
    unplaced: Vec<usize>,
    deadline_op: usize,
}

/// The known operations that may be linearized next from `group`: those
/// invoked no later than the earliest pending return (calls sort before
/// returns at equal times). The operation owning that return comes first.
fn candidates(t: &Tables<'_>, group: &Group) -> (u128, Vec<usize>) {
    let first_return = t.by_return[group.ret_pos];
    let deadline = t.times[first_return].1;
    let mut out = vec![first_return];
    for &op in t.by_call[group.call_pos..].iter().take_while(|&&o| t.times[o].0 <= deadline) {
        if op != first_return && !has_bit(&group.known, t.bit[op]) {
            out.push(op);
        }
    }
    (deadline, out)
}

/// Expands one configuration: every way to linearize one more known
/// operation, possibly preceded by a block of at most two unknown-outcome
/// operations.
///
/// A block is only tried in front of a known operation that is illegal
/// without it. An unknown-outcome operation has no return, so in any
/// linearization it can be moved later or dropped: a block followed by a
/// known operation that was already legal before the block can be moved past
/// it (if that operation leaves the state unchanged) or dropped (otherwise the
/// known operation leads to the same state, or one with a lower highest token,
/// which allows everything the other allows); trailing blocks are dropped.
/// Blocks longer than two are never needed: their net effect is to free the
/// lock, hand it to some holder, or both, and the shortest block doing that
/// leaves the lowest highest-token.
fn expand(t: &Tables<'_>, group: &Group, member: &Member, next: &mut Level, trails: &mut Vec<Trail>) {
    let (deadline, candidates) = candidates(t, group);
    let classes = t.unknown.ops.len();
    let mut used = member.used.to_vec();
    for op in candidates {
        let trail = |steps| Trail { parent: member.trail, steps };
        if let Some(state) = step(&group.state, &t.ops[op]) {
            next.add(t, group, state, &used, trail([NIL, NIL, op]), trails);
            continue;
        }
        for first in 0..classes {
            let Some(u) = t.unknown.candidate(first, &used, deadline) else {
                continue;
            };
            let Some(after_u) = step(&group.state, &t.ops[u]) else {
                continue;
            };
            used[first] += 1;
            if let Some(state) = step(&after_u, &t.ops[op]) {
                next.add(t, group, state, &used, trail([NIL, u, op]), trails);
            } else {
                for second in 0..classes {
                    let Some(v) = t.unknown.candidate(second, &used, deadline) else {
                        continue;
                    };
                    let Some(after_v) = step(&after_u, &t.ops[v]) else {
                        continue;
                    };
                    if let Some(state) = step(&after_v, &t.ops[op]) {
                        used[second] += 1;
                        next.add(t, group, state, &used, trail([u, v, op]), trails);
                        used[second] -= 1;
                    }
                }
            }
            used[first] -= 1;
        }
    }
}

/// Checks that `history` is linearizable with respect to the single-lock
/// model described in the module documentation.
pub fn check(history: &[Event]) -> Result<(), Violation> {
    let known_ops = history.iter().filter(|e| e.outcome != Outcome::Unknown).count();

    // Intern holder names and validate events.
    let mut names = Names::default();
    let mut ops = Vec::with_capacity(history.len());
    let mut times = Vec::with_capacity(history.len());
    for (i, e) in history.iter().enumerate() {
        let (kind, holder) = match &e.op {
            LockOp::Acquire { holder } => (Kind::Acquire, holder.as_str()),
            LockOp::Release { holder } => (Kind::Release, holder.as_str()),
        };
        let holder_id = names.intern(holder);
        let out = match (&e.outcome, kind) {
            (Outcome::Granted { token }, Kind::Acquire) => Out::Granted(*token),
            (Outcome::Held { by }, Kind::Acquire) => Out::Held(names.intern(by)),
            (Outcome::Released, Kind::Release) => Out::Released,
            (Outcome::NotHeld, Kind::Release) => Out::NotHeld,
            (Outcome::NotOwner { by }, Kind::Release) => Out::NotOwner(names.intern(by)),
            (Outcome::Unknown, _) => Out::Unknown,
            _ => return Err(malformed(format!("{}: this outcome is not a possible result of this operation", describe(i, e)), known_ops)),
        };
        if out != Out::Unknown && e.returned_ns < e.invoked_ns {
            return Err(malformed(format!("{}: returned before it was invoked", describe(i, e)), known_ops));
        }
        ops.push(Op { kind, holder: holder_id, out });
        times.push((e.invoked_ns, e.returned_ns));
    }
    if known_ops == 0 {
        return Ok(());
    }

    let mut bit = vec![NIL; ops.len()];
    let mut zobrist = Vec::with_capacity(known_ops);
    for (i, op) in ops.iter().enumerate() {
        if op.known() {
            bit[i] = zobrist.len();
            zobrist.push(splitmix64(i as u64));
        }
    }
    let mut by_call: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].known()).collect();
    let mut by_return = by_call.clone();
    by_call.sort_by_key(|&i| (times[i].0, i));
    by_return.sort_by_key(|&i| (times[i].1, i));
    let unknown = UnknownClasses::new(&ops, &times);
    let tables = Tables { ops: &ops, times: &times, by_call, by_return, bit, zobrist, unknown };

    // Breadth-first over the number of linearized known operations: level
    // `n` holds every distinct configuration with `n` of them linearized.
    let mut trails: Vec<Trail> = Vec::new();
    let mut level = Level::default();
    level.groups.push(Group {
        known: vec![0u64; known_ops.div_ceil(64)].into(),
        known_hash: 0,
        state: LockState::default(),
        call_pos: 0,
        ret_pos: 0,
        members: vec![Member { used: vec![0; tables.unknown.ops.len()].into(), trail: NIL }],
    });
    for _ in 0..known_ops {
        let mut next = Level::default();
        for group in &level.groups {
            for member in &group.members {
                expand(&tables, group, member, &mut next, &mut trails);
            }
        }
        if next.groups.is_empty() {
            return Err(violation(history, &names.names, known_ops, stuck(&tables, &level, &trails)));
        }
        level = next;
    }
    Ok(())
}

/// Describes the first configuration of the deepest level: the path to it
/// and the operations that could not be placed after it.
fn stuck(t: &Tables<'_>, level: &Level, trails: &[Trail]) -> Option<Best> {
    let group = level.groups.first()?;
    let member = group.members.first()?;
    let mut prefix = Vec::new();
    let mut at = member.trail;
    while let Some(trail) = trails.get(at) {
        prefix.extend(trail.steps.iter().rev().filter(|&&op| op != NIL));
        at = trail.parent;
    }
    prefix.reverse();
    let (_, unplaced) = candidates(t, group);
    Some(Best { prefix, state: group.state, deadline_op: unplaced[0], unplaced })
}

/// Holder names interned to small integers so model states are `Copy`.
#[derive(Default)]
struct Names<'a> {
    ids: HashMap<&'a str, u32>,
    names: Vec<String>,
}

impl<'a> Names<'a> {
    fn intern(&mut self, name: &'a str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(name, id);
        self.names.push(name.to_string());
        id
    }
}

fn violation(history: &[Event], names: &[String], known_ops: usize, best: Option<Best>) -> Violation {
    const SHOW_PREFIX: usize = 12;
    let Some(best) = best else {
        return Violation {
            message: "history is not linearizable (the search found no partial linearization)".to_string(),
            longest_prefix: Vec::new(),
            unplaced: Vec::new(),
            known_ops,
        };
    };
    let mut msg = String::new();
    let prefix_known = best.prefix.iter().filter(|&&i| history[i].outcome != Outcome::Unknown).count();
    msg.push_str(&format!(
        "history of {} operations ({known_ops} with a known outcome) is not linearizable \
         against the single-lock model.\n",
        history.len()
    ));
    msg.push_str(&format!(
        "Longest linearizable prefix: {} operations ({prefix_known} of {known_ops} known-outcome \
         operations placed)",
        best.prefix.len()
    ));
    let skip = best.prefix.len().saturating_sub(SHOW_PREFIX);
    if skip > 0 {
        msg.push_str(&format!(", showing the last {SHOW_PREFIX}:\n  ... {skip} earlier\n"));
    } else {
        msg.push_str(":\n");
    }
    for &i in &best.prefix[skip..] {
        let note = if history[i].outcome == Outcome::Unknown { "  (took effect)" } else { "" };
        msg.push_str(&format!("  {}{note}\n", describe(i, &history[i])));
    }
    msg.push_str(&format!("Lock state after it: {}.\n", describe_state(&best.state, names)));
    let deadline = &history[best.deadline_op];
    msg.push_str(&format!(
        "Could not place next (operation #{} had to take effect before it returned at {}, but \
         no legal order of the pending operations allows it):\n",
        best.deadline_op, deadline.returned_ns
    ));
    for &i in &best.unplaced {
        msg.push_str(&format!("  {}\n", describe(i, &history[i])));
    }
    Violation { message: msg, longest_prefix: best.prefix, unplaced: best.unplaced, known_ops }
}

/// Checks that fencing tokens only grow in real-time order: if a grant's
/// response precedes another grant's invocation, the later grant must carry a
/// strictly larger token, unless it is a re-acquire by the same holder of the
/// same token.
pub fn check_tokens_grow(history: &[Event]) -> Result<(), String> {
    struct Grant<'a> {
        index: usize,
        holder: &'a str,
        token: u64,
        invoked: u128,
        returned: u128,
    }
    let grants: Vec<Grant<'_>> = history
        .iter()
        .enumerate()
        .filter_map(|(index, e)| match (&e.op, &e.outcome) {
            (LockOp::Acquire { holder }, Outcome::Granted { token }) => {
                Some(Grant { index, holder: holder.as_str(), token: *token, invoked: e.invoked_ns, returned: e.returned_ns })
            }
            _ => None,
        })
        .collect();
    let mut by_return: Vec<&Grant<'_>> = grants.iter().collect();
    by_return.sort_by_key(|g| (g.returned, g.index));
    let mut by_invoke: Vec<&Grant<'_>> = grants.iter().collect();
    by_invoke.sort_by_key(|g| (g.invoked, g.index));

    // Highest token among grants that returned before the current
    // invocation, and up to two grants carrying it with distinct holders.
    let mut max_token: Option<u64> = None;
    let mut at_max: Vec<&Grant<'_>> = Vec::new();
    let mut done = 0;
    for b in by_invoke {
        while let Some(a) = by_return.get(done).filter(|a| a.returned < b.invoked) {
            done += 1;
            match max_token {
                Some(m) if a.token < m => {}
                Some(m) if a.token == m => {
                    if at_max.len() < 2 && at_max.iter().all(|w| w.holder != a.holder) {
                        at_max.push(a);
                    }
                }
                _ => {
                    max_token = Some(a.token);
                    at_max = vec![a];
                }
            }
        }
        let Some(m) = max_token else { continue };
        let witness = if b.token < m {
            at_max.first()
        } else if b.token == m {
            at_max.iter().find(|w| w.holder != b.holder)
        } else {
            None
        };
        if let Some(a) = witness {
            return Err(format!(
                "fencing token did not grow: {} was invoked after {} returned, and is not a \
                 re-acquire of the same token by the same holder",
                describe(b.index, &history[b.index]),
                describe(a.index, &history[a.index]),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn acq(h: &str) -> LockOp {
        LockOp::Acquire { holder: h.to_string() }
    }
    fn rel(h: &str) -> LockOp {
        LockOp::Release { holder: h.to_string() }
    }
    fn granted(token: u64) -> Outcome {
        Outcome::Granted { token }
    }
    fn held(by: &str) -> Outcome {
        Outcome::Held { by: by.to_string() }
    }
    fn not_owner(by: &str) -> Outcome {
        Outcome::NotOwner { by: by.to_string() }
    }
    fn ev(client: usize, op: LockOp, outcome: Outcome, inv: u128, ret: u128) -> Event {
        Event { client, op, outcome, invoked_ns: inv, returned_ns: ret }
    }

    #[test]
    fn sequential_legal_history_passes() {
        let h = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(0, acq("a"), granted(1), 11, 20), // idempotent re-acquire
            ev(1, acq("b"), held("a"), 21, 30),
            ev(1, rel("b"), not_owner("a"), 31, 40),
            ev(0, rel("a"), Outcome::Released, 41, 50),
            ev(1, rel("b"), Outcome::NotHeld, 51, 60),
            ev(1, acq("b"), granted(2), 61, 70),
            ev(1, rel("b"), Outcome::Released, 71, 80),
            ev(0, acq("a"), granted(7), 81, 90),
        ];
        check(&h).unwrap();
        check_tokens_grow(&h).unwrap();
        // The same history with the events in another order in the slice.
        let mut rev = h.clone();
        rev.reverse();
        check(&rev).unwrap();
    }

    #[test]
    fn sequential_illegal_histories_fail() {
        // Each of these is one wrong outcome in an otherwise sequential history.
        let cases: Vec<Vec<Event>> = vec![
            // Re-acquire returning a different token.
            vec![ev(0, acq("a"), granted(1), 0, 10), ev(0, acq("a"), granted(2), 11, 20)],
            // Held by someone who never acquired.
            vec![ev(0, acq("a"), granted(1), 0, 10), ev(1, acq("b"), held("c"), 11, 20)],
            // Held reported to the holder itself.
            vec![ev(0, acq("a"), granted(1), 0, 10), ev(0, acq("a"), held("a"), 11, 20)],
            // Release of a free lock reported as Released.
            vec![ev(0, rel("a"), Outcome::Released, 0, 10)],
            // NotHeld while held.
            vec![ev(0, acq("a"), granted(1), 0, 10), ev(1, rel("b"), Outcome::NotHeld, 11, 20)],
            // NotOwner naming the caller.
            vec![ev(0, acq("a"), granted(1), 0, 10), ev(0, rel("a"), not_owner("a"), 11, 20)],
            // NotOwner on a free lock.
            vec![ev(0, rel("a"), not_owner("b"), 0, 10)],
        ];
        for (n, h) in cases.iter().enumerate() {
            assert!(check(h).is_err(), "case {n} should be a violation");
        }
    }

    #[test]
    fn malformed_histories_are_rejected() {
        let wrong_kind = vec![ev(0, acq("a"), Outcome::Released, 0, 10)];
        let err = check(&wrong_kind).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
        let backwards = vec![ev(0, acq("a"), granted(1), 10, 5)];
        let err = check(&backwards).unwrap_err();
        assert!(err.to_string().contains("returned before it was invoked"), "{err}");
        // An unknown outcome's return time is ignored, so it is not malformed.
        check(&[ev(0, acq("a"), Outcome::Unknown, 10, 0)]).unwrap();
        check(&[]).unwrap();
    }

    #[test]
    fn overlapping_grants_to_different_holders_violate() {
        let h = vec![ev(0, acq("a"), granted(1), 0, 10), ev(1, acq("b"), granted(2), 5, 15)];
        let err = check(&h).unwrap_err();
        // One of them was placed; the other could not be.
        assert_eq!(err.longest_prefix.len(), 1);
        assert_eq!(err.unplaced.len(), 1);
        assert_ne!(err.longest_prefix[0], err.unplaced[0]);
        let text = err.to_string();
        assert!(text.contains("Longest linearizable prefix: 1 operations"), "{text}");
        assert!(text.contains("Could not place next"), "{text}");

        // With a release between them (in real time) it is fine.
        let ok = vec![ev(0, acq("a"), granted(1), 0, 10), ev(0, rel("a"), Outcome::Released, 11, 12), ev(1, acq("b"), granted(2), 13, 15)];
        check(&ok).unwrap();
    }

    #[test]
    fn overlapping_ops_legal_in_one_order_pass() {
        // Client 1's acquire is invoked before client 0's release, but the
        // two overlap, so the release may take effect first.
        let h = vec![ev(0, acq("a"), granted(1), 0, 10), ev(1, acq("b"), granted(2), 15, 35), ev(0, rel("a"), Outcome::Released, 20, 40)];
        check(&h).unwrap();
        // Only that order works: if the acquire returns before the release is
        // invoked, it is a violation.
        let bad = vec![ev(0, acq("a"), granted(1), 0, 10), ev(1, acq("b"), granted(2), 15, 18), ev(0, rel("a"), Outcome::Released, 20, 40)];
        let err = check(&bad).unwrap_err();
        assert_eq!(err.unplaced.first(), Some(&1), "{err}");
        // And the other order's outcomes: acquire first sees Held, release
        // afterwards still releases.
        let other =
            vec![ev(0, acq("a"), granted(1), 0, 10), ev(1, acq("b"), held("a"), 15, 35), ev(0, rel("a"), Outcome::Released, 20, 40)];
        check(&other).unwrap();
    }

    #[test]
    fn stale_held_after_release_violates() {
        let h = vec![ev(0, acq("a"), granted(1), 0, 10), ev(0, rel("a"), Outcome::Released, 20, 30), ev(1, acq("b"), held("a"), 40, 50)];
        let err = check(&h).unwrap_err();
        assert_eq!(err.longest_prefix, vec![0, 1]);
        assert_eq!(err.unplaced, vec![2]);
        assert!(err.to_string().contains("Lock state after it: free"), "{err}");
        // If the Held overlaps the release, it could have been read first.
        let ok = vec![ev(0, acq("a"), granted(1), 0, 10), ev(0, rel("a"), Outcome::Released, 20, 30), ev(1, acq("b"), held("a"), 25, 50)];
        check(&ok).unwrap();
    }

    #[test]
    fn tokens_must_grow() {
        let h = vec![ev(0, acq("a"), granted(10), 0, 10), ev(0, rel("a"), Outcome::Released, 20, 30), ev(1, acq("b"), granted(5), 40, 50)];
        assert!(check(&h).is_err());
        let msg = check_tokens_grow(&h).unwrap_err();
        assert!(msg.contains("#2") && msg.contains("#0"), "{msg}");

        // Reusing the same token for a new grant also fails.
        let mut same = h.clone();
        same[2].outcome = granted(10);
        assert!(check(&same).is_err());
        assert!(check_tokens_grow(&same).is_err());

        // A larger token passes both.
        let mut ok = h.clone();
        ok[2].outcome = granted(11);
        check(&ok).unwrap();
        check_tokens_grow(&ok).unwrap();

        // Re-acquire of the same token by the same holder is fine for both.
        let reacquire = vec![ev(0, acq("a"), granted(10), 0, 10), ev(0, acq("a"), granted(10), 20, 30)];
        check(&reacquire).unwrap();
        check_tokens_grow(&reacquire).unwrap();

        // Tokens must exceed every earlier grant, not only the latest one:
        // a -> 10, b -> 20, then c -> 15.
        let skip = vec![
            ev(0, acq("a"), granted(10), 0, 10),
            ev(0, rel("a"), Outcome::Released, 11, 12),
            ev(1, acq("b"), granted(20), 13, 14),
            ev(1, rel("b"), Outcome::Released, 15, 16),
            ev(2, acq("c"), granted(15), 17, 18),
        ];
        assert!(check(&skip).is_err());
        assert!(check_tokens_grow(&skip).is_err());
    }

    #[test]
    fn check_tokens_grow_only_orders_by_real_time() {
        // Overlapping grants are not ordered by real time.
        let concurrent = vec![ev(0, acq("a"), granted(10), 0, 50), ev(1, acq("b"), granted(5), 10, 60)];
        check_tokens_grow(&concurrent).unwrap();
        // A same-token "re-acquire" by a different holder is a new grant.
        let stolen = vec![ev(0, acq("a"), granted(10), 0, 10), ev(1, acq("b"), granted(10), 20, 30)];
        assert!(check_tokens_grow(&stolen).is_err());
        // Two different holders were both granted 10 earlier: whoever gets 10
        // later conflicts with one of them.
        let twice = vec![ev(0, acq("a"), granted(10), 0, 10), ev(1, acq("b"), granted(10), 0, 10), ev(0, acq("a"), granted(10), 20, 30)];
        assert!(check_tokens_grow(&twice).is_err());
    }

    #[test]
    fn unknown_outcomes() {
        // The unknown acquire by "a" took effect: "b" later sees it held.
        let took_effect =
            vec![ev(0, acq("a"), Outcome::Unknown, 0, 0), ev(1, acq("b"), held("a"), 100, 110), ev(1, rel("b"), not_owner("a"), 120, 130)];
        check(&took_effect).unwrap();

        // This unknown acquire must not have taken effect (at least not
        // before everything else): every observation shows the lock free or
        // held by someone else.
        let no_effect = vec![
            ev(0, acq("a"), Outcome::Unknown, 0, 5),
            ev(1, acq("b"), granted(1), 10, 20),
            ev(1, rel("b"), Outcome::Released, 30, 40),
            ev(2, rel("c"), Outcome::NotHeld, 50, 60),
            ev(2, acq("c"), granted(2), 70, 80),
            ev(2, rel("c"), Outcome::Released, 90, 100),
        ];
        check(&no_effect).unwrap();

        // Without the unknown acquire, a Held{by: "a"} is a violation.
        let without = vec![took_effect[1].clone()];
        assert!(check(&without).is_err());

        // An unknown release that took effect.
        let release_effect = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(0, rel("a"), Outcome::Unknown, 20, 25),
            ev(1, acq("b"), held("a"), 30, 40),
            ev(1, acq("b"), granted(2), 50, 60),
        ];
        check(&release_effect).unwrap();

        // An unknown op can only take effect after its invocation.
        let too_early = vec![ev(1, acq("b"), held("a"), 0, 10), ev(0, acq("a"), Outcome::Unknown, 20, 0)];
        assert!(check(&too_early).is_err());
    }

    #[test]
    fn unknown_grant_tokens_are_constrained() {
        // The unknown grant's token is bound by a later re-acquire.
        let base = vec![
            ev(0, acq("a"), Outcome::Unknown, 0, 5),
            ev(0, acq("a"), granted(7), 10, 20),
            ev(1, acq("b"), held("a"), 30, 40),
            ev(0, rel("a"), Outcome::Released, 50, 60),
            ev(1, acq("b"), granted(8), 70, 80),
        ];
        check(&base).unwrap();
        let mut stale = base.clone();
        stale[4].outcome = granted(7);
        assert!(check(&stale).is_err());

        // Its token is above every earlier grant, so a later grant must be
        // above that as well: a -> 5, b (unknown, observed) -> >= 6, c -> 6 is
        // impossible but c -> 7 is fine.
        let lower_bound = vec![
            ev(0, acq("a"), granted(5), 0, 10),
            ev(0, rel("a"), Outcome::Released, 20, 30),
            ev(1, acq("b"), Outcome::Unknown, 40, 45),
            ev(2, acq("c"), held("b"), 50, 60),
            ev(1, rel("b"), Outcome::Released, 70, 80),
            ev(2, acq("c"), granted(6), 90, 100),
        ];
        assert!(check(&lower_bound).is_err());
        let mut fine = lower_bound.clone();
        fine[5].outcome = granted(7);
        check(&fine).unwrap();
        // A re-acquire cannot bind the unknown grant to a token at or below
        // an earlier grant.
        let low_bind = vec![
            ev(0, acq("a"), granted(5), 0, 10),
            ev(0, rel("a"), Outcome::Released, 20, 30),
            ev(1, acq("b"), Outcome::Unknown, 40, 45),
            ev(1, acq("b"), granted(5), 50, 60),
        ];
        assert!(check(&low_bind).is_err());
    }

    #[test]
    fn unknown_operations_are_not_wasted() {
        // X and Y overlap. X then Y needs no unknown operation; Y then X needs
        // both of b's unknown operations (release, then acquire). The two
        // orders meet again after c's grant, and the last event needs b's
        // unknown acquire, so only the first order can be completed.
        let h = vec![
            ev(1, acq("b"), granted(1), 0, 5),
            ev(1, rel("b"), Outcome::Unknown, 1, 0),
            ev(1, acq("b"), Outcome::Unknown, 2, 0),
            ev(1, rel("b"), Outcome::Released, 10, 30), // X
            ev(2, rel("c"), Outcome::NotHeld, 10, 30),  // Y
            ev(2, acq("c"), granted(5), 40, 50),
            ev(2, rel("c"), Outcome::Released, 60, 70),
            ev(3, acq("d"), held("b"), 80, 90),
        ];
        assert!(brute_force(&h));
        check(&h).unwrap();
        // Without the unknown acquire the last event cannot be explained.
        let mut without = h.clone();
        without.remove(2);
        assert!(!brute_force(&without));
        assert!(check(&without).is_err());
    }

    /// Simulates a correct lock: each client issues sequential operations
    /// with random intervals; each takes effect at a random point inside its
    /// interval, and outcomes are computed by the sequential specification in
    /// the order of those points. With `unknown_per_mille > 0`, some outcomes
    /// are replaced by `Unknown` (and half of those never take effect).
    fn simulate(seed: u64, clients: usize, ops: usize, unknown_per_mille: u32) -> Vec<Event> {
        struct Planned {
            client: usize,
            acquire: bool,
            inv: u128,
            ret: u128,
            point: u128,
            unknown: bool,
            skip_effect: bool,
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let k = clients as u128;
        let mut planned = Vec::new();
        for client in 0..clients {
            let mut cursor: u128 = rng.random_range(0..10);
            for _ in 0..ops / clients {
                let inv = cursor + rng.random_range(0..20);
                let ret = inv + rng.random_range(1..60);
                let point = rng.random_range(inv..=ret);
                cursor = ret + 1;
                let unknown = rng.random_range(0..1000) < unknown_per_mille;
                planned.push(Planned {
                    client,
                    acquire: rng.random_bool(0.55),
                    // Scale so that linearization points are unique and stay
                    // inside the intervals.
                    inv: inv * k,
                    ret: ret * k + (k - 1),
                    point: point * k + client as u128,
                    unknown,
                    skip_effect: unknown && rng.random_bool(0.5),
                });
            }
        }
        let mut order: Vec<usize> = (0..planned.len()).collect();
        order.sort_by_key(|&i| planned[i].point);
        let name = |c: usize| format!("c{c}");
        let mut outcomes = vec![Outcome::Unknown; planned.len()];
        let mut state: Option<(usize, u64)> = None;
        let mut next_token = 0u64;
        for i in order {
            let p = &planned[i];
            if p.skip_effect {
                continue;
            }
            outcomes[i] = match (p.acquire, state) {
                (true, None) => {
                    next_token += rng.random_range(1..=3);
                    state = Some((p.client, next_token));
                    granted(next_token)
                }
                (true, Some((h, t))) if h == p.client => granted(t),
                (true, Some((h, _))) => held(&name(h)),
                (false, None) => Outcome::NotHeld,
                (false, Some((h, _))) if h == p.client => {
                    state = None;
                    Outcome::Released
                }
                (false, Some((h, _))) => not_owner(&name(h)),
            };
            if p.unknown {
                outcomes[i] = Outcome::Unknown;
            }
        }
        planned
            .iter()
            .zip(outcomes)
            .map(|(p, outcome)| Event {
                client: p.client,
                op: if p.acquire { acq(&name(p.client)) } else { rel(&name(p.client)) },
                outcome,
                invoked_ns: p.inv,
                returned_ns: p.ret,
            })
            .collect()
    }

    /// Index of a known grant invoked after some other known grant returned.
    fn late_grant(h: &[Event]) -> usize {
        let first_return = h.iter().filter(|e| matches!(e.outcome, Outcome::Granted { .. })).map(|e| e.returned_ns).min().unwrap();
        h.iter().rposition(|e| matches!(e.outcome, Outcome::Granted { .. }) && e.invoked_ns > first_return).unwrap()
    }

    #[test]
    fn randomized_correct_lock_passes_and_corruption_fails() {
        let h = simulate(0x5eed, 3, 3000, 0);
        assert_eq!(h.len(), 3000);
        // The generated history exercises every outcome.
        for probe in [granted(0), held(""), Outcome::Released, Outcome::NotHeld, not_owner("")] {
            assert!(h.iter().any(|e| std::mem::discriminant(&e.outcome) == std::mem::discriminant(&probe)), "no {probe:?} generated");
        }
        check(&h).unwrap();
        check_tokens_grow(&h).unwrap();

        // Corrupt a Released into NotHeld: only the holder can free its lock,
        // so this can never be linearized.
        let mut bad = h.clone();
        let i = bad.iter().rposition(|e| e.outcome == Outcome::Released).unwrap();
        bad[i].outcome = Outcome::NotHeld;
        let err = check(&bad).unwrap_err();
        assert!(err.unplaced.contains(&i), "{err}");
        assert!(err.longest_prefix.len() < h.len());

        // Corrupt a late grant's token to 0 (every token is >= 1).
        let mut bad = h.clone();
        let g = late_grant(&bad);
        bad[g].outcome = granted(0);
        assert!(check(&bad).is_err());
        assert!(check_tokens_grow(&bad).is_err());
    }

    #[test]
    fn randomized_with_unknown_outcomes() {
        let h = simulate(7, 3, 3000, 20);
        let unknown = h.iter().filter(|e| e.outcome == Outcome::Unknown).count();
        assert!(unknown > 20, "only {unknown} unknown outcomes");
        check(&h).unwrap();
        check_tokens_grow(&h).unwrap();

        let mut bad = h.clone();
        let g = late_grant(&bad);
        bad[g].outcome = granted(0);
        assert!(check(&bad).is_err());
    }

    #[test]
    fn randomized_four_clients_six_thousand_ops() {
        for seed in 1..=3 {
            let h = simulate(seed, 4, 6000, 5);
            check(&h).unwrap();
            check_tokens_grow(&h).unwrap();
        }
        let h = simulate(11, 2, 6000, 0);
        check(&h).unwrap();
        let mut bad = h.clone();
        let i = bad.iter().position(|e| matches!(e.outcome, Outcome::Held { .. })).unwrap();
        // Held by the caller itself is never legal.
        let LockOp::Acquire { holder } = &bad[i].op else { unreachable!() };
        bad[i].outcome = held(&holder.clone());
        assert!(check(&bad).is_err());
    }

    type Lock = (Option<(String, u64)>, Option<u64>);

    /// The specification, written independently of `step`: the next lock
    /// state if `outcome` is legal for `op` in `lock`.
    fn spec(op: &LockOp, outcome: &Outcome, lock: &Lock) -> Option<Lock> {
        let (held, max) = lock;
        match (op, outcome, held) {
            (LockOp::Acquire { holder }, Outcome::Granted { token }, None) if max.is_none_or(|m| *token > m) => {
                Some((Some((holder.clone(), *token)), Some(*token)))
            }
            (LockOp::Acquire { holder }, Outcome::Granted { token }, Some((h, t))) if h == holder && t == token => Some(lock.clone()),
            (LockOp::Acquire { holder }, Outcome::Held { by }, Some((h, _))) if h == by && h != holder => Some(lock.clone()),
            (LockOp::Release { holder }, Outcome::Released, Some((h, _))) if h == holder => Some((None, *max)),
            (LockOp::Release { .. }, Outcome::NotHeld, None) => Some(lock.clone()),
            (LockOp::Release { holder }, Outcome::NotOwner { by }, Some((h, _))) if h == by && h != holder => Some(lock.clone()),
            _ => None,
        }
    }

    /// Brute-force linearizability: tries every order that respects real
    /// time; unknown-outcome operations may be left out or take effect with
    /// any outcome (an unobserved grant's token is max+1 or any token that
    /// appears in the history, which covers every distinguishable choice).
    fn brute_force(h: &[Event]) -> bool {
        fn go(h: &[Event], placed: &mut Vec<bool>, lock: &Lock, tokens: &[u64]) -> bool {
            let pending_known = |placed: &[bool], j: usize| !placed[j] && h[j].outcome != Outcome::Unknown;
            if !(0..h.len()).any(|j| pending_known(placed, j)) {
                return true;
            }
            for i in 0..h.len() {
                if placed[i] || (0..h.len()).any(|j| pending_known(placed, j) && h[j].returned_ns < h[i].invoked_ns) {
                    continue;
                }
                let outcomes = if h[i].outcome == Outcome::Unknown {
                    let mut all = vec![Outcome::Released, Outcome::NotHeld];
                    if let Some((holder, _)) = &lock.0 {
                        all.push(held(holder));
                        all.push(not_owner(holder));
                    }
                    let next = lock.1.map_or(0, |m| m + 1);
                    all.extend(tokens.iter().chain([&next]).map(|&t| granted(t)));
                    all
                } else {
                    vec![h[i].outcome.clone()]
                };
                for outcome in outcomes {
                    if let Some(next) = spec(&h[i].op, &outcome, lock) {
                        placed[i] = true;
                        if go(h, placed, &next, tokens) {
                            return true;
                        }
                        placed[i] = false;
                    }
                }
            }
            false
        }
        let tokens: Vec<u64> = h
            .iter()
            .filter_map(|e| match e.outcome {
                Outcome::Granted { token } => Some(token),
                _ => None,
            })
            .collect();
        go(h, &mut vec![false; h.len()], &(None, None), &tokens)
    }

    fn random_history(rng: &mut StdRng) -> Vec<Event> {
        let names = ["a", "b", "c"];
        let n = rng.random_range(1..=7);
        if rng.random_bool(0.5) {
            // A legal history with small tokens, maybe with one outcome changed.
            let clients = rng.random_range(2..=3);
            let mut h = simulate(rng.random(), clients, n.max(clients), 250);
            if rng.random_bool(0.5) {
                let i = rng.random_range(0..h.len());
                let by = names[rng.random_range(0..3)];
                h[i].outcome = match (&h[i].op, rng.random_range(0..3)) {
                    (LockOp::Acquire { .. }, 0) => held(by),
                    (LockOp::Acquire { .. }, _) => granted(rng.random_range(0..5)),
                    (LockOp::Release { .. }, 0) => Outcome::NotHeld,
                    (LockOp::Release { .. }, 1) => Outcome::Released,
                    (LockOp::Release { .. }, _) => not_owner(by),
                };
            }
            return h;
        }
        // Random intervals and outcomes; sometimes few holders and many
        // unknown outcomes, which needs blocks of two unknown operations.
        let (holders, p_unknown) = if rng.random_bool(0.5) { (3, 0.15) } else { (2, 0.4) };
        (0..n)
            .map(|_| {
                let client = rng.random_range(0..holders);
                let inv = rng.random_range(0..30);
                let ret = inv + rng.random_range(0..12);
                let by = names[rng.random_range(0..holders)];
                let acquire = rng.random_bool(0.5);
                let outcome = if rng.random_bool(p_unknown) {
                    Outcome::Unknown
                } else {
                    match (acquire, rng.random_range(0..5)) {
                        (true, 0) => held(by),
                        (true, _) => granted(rng.random_range(1..5)),
                        (false, 0 | 1) => Outcome::Released,
                        (false, 2) => not_owner(by),
                        (false, _) => Outcome::NotHeld,
                    }
                };
                let holder = names[client];
                let op = if acquire { acq(holder) } else { rel(holder) };
                ev(client, op, outcome, inv, ret)
            })
            .collect()
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = StdRng::seed_from_u64(2024);
        let (mut legal, mut illegal, mut with_unknown) = (0, 0, 0);
        for round in 0..4000 {
            let h = random_history(&mut rng);
            let expected = brute_force(&h);
            let got = check(&h);
            assert_eq!(got.is_ok(), expected, "round {round}: {h:#?}\n{got:?}");
            if expected {
                legal += 1;
            } else {
                illegal += 1;
            }
            if expected && h.iter().any(|e| e.outcome == Outcome::Unknown) {
                with_unknown += 1;
            }
        }
        assert!(legal > 800 && illegal > 800 && with_unknown > 200, "{legal} {illegal} {with_unknown}");
    }

    #[test]
    fn history_round_trips_through_json() {
        let h = simulate(3, 3, 30, 100);
        let json = serde_json::to_string(&h).unwrap();
        let back: Vec<Event> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), h.len());
        assert!(back.iter().zip(&h).all(|(a, b)| a.op == b.op && a.outcome == b.outcome));
        check(&back).unwrap();
    }
}
