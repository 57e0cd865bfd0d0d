//! Linearizability checker for histories of operations on ONE replicated lock.
//!
//! The algorithm is Wing & Gong's search with Lowe's memoization, as used by
//! Porcupine: the history becomes a list of call and return entries sorted by
//! time; a depth-first search repeatedly linearizes some pending operation
//! whose call precedes the earliest pending return, backtracking when the
//! earliest pending return is reached without its operation having been
//! linearized. A cache of (set of linearized operations, model state) prunes
//! configurations that were already explored. The search is iterative (an
//! explicit stack and a dancing-links entry list), so long histories cannot
//! overflow the call stack.
//!
//! Operations whose outcome is [`Outcome::Unknown`] get a return time of
//! +infinity: they may be linearized at any point after their invocation, with
//! whatever outcome is legal there, or never. The search succeeds as soon as
//! every operation with a known outcome is linearized.
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
    Granted { token: u64 },
    Held { by: String },
    Released,
    NotHeld,
    NotOwner { by: String },
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            None if state.max_token.is_none_or(|m| t > m) => Some(LockState {
                held: Some(Holding { holder: op.holder, token: t, tentative: false }),
                max_token: Some(t),
            }),
            None => None,
            Some(h) if h.holder == op.holder => {
                if h.tentative {
                    // Binds the unobserved token of an unknown-outcome grant.
                    (t >= h.token).then_some(LockState {
                        held: Some(Holding { holder: op.holder, token: t, tentative: false }),
                        max_token: Some(t),
                    })
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
                Some(LockState {
                    held: Some(Holding { holder: op.holder, token: lower, tentative: true }),
                    max_token: Some(lower),
                })
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
        (Kind::Acquire, Out::Released | Out::NotHeld | Out::NotOwner(_))
        | (Kind::Release, Out::Granted(_) | Out::Held(_)) => None,
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
    let ret = if e.outcome == Outcome::Unknown {
        "?".to_string()
    } else {
        e.returned_ns.to_string()
    };
    format!("#{i} client {} {op} -> {out} [invoked {}, returned {ret}]", e.client, e.invoked_ns)
}

fn describe_state(state: &LockState, names: &[String]) -> String {
    let name = |id: u32| names.get(id as usize).map_or("?", String::as_str);
    let held = match state.held {
        None => "free".to_string(),
        Some(h) if h.tentative => format!(
            "held by {:?} with an unobserved token >= {} (granted by an unknown-outcome acquire)",
            name(h.holder),
            h.token
        ),
        Some(h) => format!("held by {:?} with token {}", name(h.holder), h.token),
    };
    match state.max_token {
        None => format!("{held}; no token granted yet"),
        Some(m) => format!("{held}; highest token granted so far {m}"),
    }
}

fn malformed(message: String, known_ops: usize) -> Violation {
    Violation {
        message: format!("malformed history: {message}"),
        longest_prefix: Vec::new(),
        unplaced: Vec::new(),
        known_ops,
    }
}

// ---------------------------------------------------------------------------
// Checker
// ---------------------------------------------------------------------------

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// Doubly linked list with O(1) removal and LIFO re-insertion ("dancing
/// links"). Node 0 is the head sentinel; node `k + 1` holds item `k`.
struct Links {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Links {
    fn new(items: usize) -> Self {
        let len = items + 1;
        let mut next: Vec<usize> = (1..=len).collect();
        next[len - 1] = NIL;
        let prev: Vec<usize> = (0..len).map(|k| k.wrapping_sub(1)).collect();
        Links { next, prev }
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    /// Undoes `unlink(node)`; re-insertions must happen in reverse order.
    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }
}

/// Call and return entries of the operations with a known outcome, sorted by
/// time; at equal times calls come first, so operations that touch in time
/// count as concurrent.
struct KnownEntries {
    links: Links,
    /// Operation (history index) of each node.
    op: Vec<usize>,
    is_call: Vec<bool>,
    time: Vec<u128>,
    /// Call and return node of each operation (indexed by history index).
    call_node: Vec<usize>,
    ret_node: Vec<usize>,
}

impl KnownEntries {
    fn new(ops: &[Op], times: &[(u128, u128)]) -> Self {
        let mut entries: Vec<(u128, bool, usize)> = Vec::new();
        for (i, (op, &(inv, ret))) in ops.iter().zip(times).enumerate() {
            if op.known() {
                entries.push((inv, false, i));
                entries.push((ret, true, i));
            }
        }
        entries.sort_unstable();
        let len = entries.len() + 1;
        let mut list = KnownEntries {
            links: Links::new(entries.len()),
            op: vec![NIL; len],
            is_call: vec![false; len],
            time: vec![0; len],
            call_node: vec![NIL; ops.len()],
            ret_node: vec![NIL; ops.len()],
        };
        for (k, &(time, is_return, i)) in entries.iter().enumerate() {
            let node = k + 1;
            list.op[node] = i;
            list.is_call[node] = !is_return;
            list.time[node] = time;
            if is_return {
                list.ret_node[i] = node;
            } else {
                list.call_node[i] = node;
            }
        }
        list
    }

    /// Removes an operation's call and return entries.
    fn lift(&mut self, op: usize) {
        self.links.unlink(self.call_node[op]);
        self.links.unlink(self.ret_node[op]);
    }

    fn unlift(&mut self, op: usize) {
        self.links.relink(self.ret_node[op]);
        self.links.relink(self.call_node[op]);
    }
}

/// Pending operations with an unknown outcome, sorted by invocation time.
/// Their return is at +infinity, so they never bound the search; one is a
/// candidate whenever it was invoked no later than the earliest pending
/// return of a known operation.
struct UnknownEntries {
    links: Links,
    op: Vec<usize>,
    invoked: Vec<u128>,
    node: Vec<usize>,
}

impl UnknownEntries {
    fn new(ops: &[Op], times: &[(u128, u128)]) -> Self {
        let mut entries: Vec<(u128, usize)> = ops
            .iter()
            .zip(times)
            .enumerate()
            .filter(|(_, (op, _))| !op.known())
            .map(|(i, (_, &(inv, _)))| (inv, i))
            .collect();
        entries.sort_unstable();
        let mut list = UnknownEntries {
            links: Links::new(entries.len()),
            op: vec![NIL; entries.len() + 1],
            invoked: vec![0; entries.len() + 1],
            node: vec![NIL; ops.len()],
        };
        for (k, &(inv, i)) in entries.iter().enumerate() {
            list.op[k + 1] = i;
            list.invoked[k + 1] = inv;
            list.node[i] = k + 1;
        }
        list
    }
}

/// Memo of explored configurations: (set of linearized known operations,
/// model state) -> sets of applied unknown-outcome operations.
///
/// Applying an unknown-outcome operation only removes options (it could also
/// have been dropped), so a configuration is dominated by one with the same
/// known set and state and a SUBSET of the applied unknown operations.
/// Every configuration in the memo has been (or is being) explored, so a
/// dominated one is pruned. Without unknown-outcome operations this is
/// exactly Lowe's (bitset, state) cache.
#[derive(Default)]
struct Cache {
    buckets: HashMap<u64, Vec<CacheEntry>>,
}

struct CacheEntry {
    known: Box<[u64]>,
    state: LockState,
    unknown_sets: Vec<Box<[u64]>>,
}

fn is_subset(small: &[u64], big: &[u64]) -> bool {
    small.iter().zip(big).all(|(s, b)| s & !b == 0)
}

impl Cache {
    /// Records the configuration; returns false if it is dominated by one
    /// already recorded.
    fn insert(&mut self, known: &[u64], state: LockState, unknown: &[u64]) -> bool {
        let mut hasher = DefaultHasher::new();
        known.hash(&mut hasher);
        state.hash(&mut hasher);
        let bucket = self.buckets.entry(hasher.finish()).or_default();
        let Some(entry) = bucket.iter_mut().find(|e| e.state == state && *e.known == *known)
        else {
            bucket.push(CacheEntry { known: known.into(), state, unknown_sets: vec![unknown.into()] });
            return true;
        };
        if entry.unknown_sets.iter().any(|u| is_subset(u, unknown)) {
            return false;
        }
        entry.unknown_sets.retain(|u| !is_subset(unknown, u));
        entry.unknown_sets.push(unknown.into());
        true
    }
}

fn flip(bits: &mut [u64], index: usize) {
    bits[index / 64] ^= 1u64 << (index % 64);
}

/// Where the search is scanning for the next operation to linearize.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// A node of the known-outcome entry list.
    Known(usize),
    /// A node of the unknown-outcome list (scanned after the known calls).
    Unknown(usize),
}

/// One linearized operation on the search stack.
struct Frame {
    cursor: Cursor,
    /// State before the operation.
    state: LockState,
    /// Earliest pending known return when the operation was chosen.
    frontier: usize,
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

/// Best (deepest) point the search reached before having to backtrack.
struct Best {
    prefix: Vec<usize>,
    state: LockState,
    unplaced: Vec<usize>,
    deadline_op: usize,
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
            _ => {
                return Err(malformed(
                    format!(
                        "{}: this outcome is not a possible result of this operation",
                        describe(i, e)
                    ),
                    known_ops,
                ))
            }
        };
        if out != Out::Unknown && e.returned_ns < e.invoked_ns {
            return Err(malformed(
                format!("{}: returned before it was invoked", describe(i, e)),
                known_ops,
            ));
        }
        ops.push(Op { kind, holder: holder_id, out });
        times.push((e.invoked_ns, e.returned_ns));
    }

    if known_ops == 0 {
        return Ok(());
    }

    // Dense indices for the two bitsets.
    let mut dense = Vec::with_capacity(ops.len());
    let (mut n_known, mut n_unknown) = (0usize, 0usize);
    for op in &ops {
        if op.known() {
            dense.push(n_known);
            n_known += 1;
        } else {
            dense.push(n_unknown);
            n_unknown += 1;
        }
    }

    let mut known = KnownEntries::new(&ops, &times);
    let mut unknown = UnknownEntries::new(&ops, &times);
    let mut known_bits = vec![0u64; n_known.div_ceil(64)];
    let mut unknown_bits = vec![0u64; n_unknown.div_ceil(64)];
    let mut cache = Cache::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut state = LockState::default();
    let mut best: Option<Best> = None;
    let mut known_done = 0usize;
    // Earliest pending known return; set whenever the known scan reaches it.
    let mut frontier = NIL;
    let mut cursor = Cursor::Known(known.links.next[HEAD]);

    loop {
        // Pick the next candidate operation, or fall through to backtrack.
        let candidate = match cursor {
            Cursor::Known(node) => {
                if node == NIL {
                    // Unreachable: a pending known operation's return entry
                    // stays in the list, and the scan stops there.
                    break;
                }
                if known.is_call[node] {
                    Some(known.op[node])
                } else {
                    // Every known call before the earliest pending return was
                    // tried; now the unknown-outcome operations.
                    frontier = node;
                    cursor = Cursor::Unknown(unknown.links.next[HEAD]);
                    continue;
                }
            }
            Cursor::Unknown(node) => {
                if node != NIL && unknown.invoked[node] <= known.time[frontier] {
                    Some(unknown.op[node])
                } else {
                    None
                }
            }
        };

        if let Some(op_index) = candidate {
            let op = &ops[op_index];
            let next_state = step(&state, op);
            let mut pushed = false;
            if let Some(next_state) = next_state {
                let bits = if op.known() { &mut known_bits } else { &mut unknown_bits };
                flip(bits, dense[op_index]);
                if cache.insert(&known_bits, next_state, &unknown_bits) {
                    stack.push(Frame { cursor, state, frontier });
                    state = next_state;
                    if op.known() {
                        known.lift(op_index);
                        known_done += 1;
                        if known_done == n_known {
                            return Ok(());
                        }
                    } else {
                        unknown.links.unlink(unknown.node[op_index]);
                    }
                    cursor = Cursor::Known(known.links.next[HEAD]);
                    pushed = true;
                } else {
                    let bits = if op.known() { &mut known_bits } else { &mut unknown_bits };
                    flip(bits, dense[op_index]);
                }
            }
            if !pushed {
                cursor = match cursor {
                    Cursor::Known(node) => Cursor::Known(known.links.next[node]),
                    Cursor::Unknown(node) => Cursor::Unknown(unknown.links.next[node]),
                };
            }
            continue;
        }

        // No candidate can be linearized before the earliest pending return:
        // record how far we got, then backtrack.
        if best.as_ref().is_none_or(|b| stack.len() > b.prefix.len()) {
            let deadline_op = known.op[frontier];
            let mut unplaced = vec![deadline_op];
            let mut node = known.links.next[HEAD];
            while node != frontier && node != NIL {
                if known.is_call[node] && known.op[node] != deadline_op {
                    unplaced.push(known.op[node]);
                }
                node = known.links.next[node];
            }
            best = Some(Best {
                prefix: stack.iter().map(|f| frame_op(f, &known, &unknown)).collect(),
                state,
                unplaced,
                deadline_op,
            });
        }
        let Some(frame) = stack.pop() else {
            break;
        };
        let undone = frame_op(&frame, &known, &unknown);
        state = frame.state;
        frontier = frame.frontier;
        cursor = match frame.cursor {
            Cursor::Known(node) => {
                flip(&mut known_bits, dense[undone]);
                known.unlift(undone);
                known_done -= 1;
                Cursor::Known(known.links.next[node])
            }
            Cursor::Unknown(node) => {
                flip(&mut unknown_bits, dense[undone]);
                unknown.links.relink(node);
                Cursor::Unknown(unknown.links.next[node])
            }
        };
    }

    Err(violation(history, &names.names, known_ops, best))
}

fn frame_op(frame: &Frame, known: &KnownEntries, unknown: &UnknownEntries) -> usize {
    match frame.cursor {
        Cursor::Known(node) => known.op[node],
        Cursor::Unknown(node) => unknown.op[node],
    }
}

fn violation(history: &[Event], names: &[String], known_ops: usize, best: Option<Best>) -> Violation {
    const SHOW_PREFIX: usize = 12;
    let Some(best) = best else {
        return Violation {
            message: "history is not linearizable (the search found no partial linearization)"
                .to_string(),
            longest_prefix: Vec::new(),
            unplaced: Vec::new(),
            known_ops,
        };
    };
    let mut msg = String::new();
    let prefix_known = best
        .prefix
        .iter()
        .filter(|&&i| history[i].outcome != Outcome::Unknown)
        .count();
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
    Violation {
        message: msg,
        longest_prefix: best.prefix,
        unplaced: best.unplaced,
        known_ops,
    }
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
            (LockOp::Acquire { holder }, Outcome::Granted { token }) => Some(Grant {
                index,
                holder: holder.as_str(),
                token: *token,
                invoked: e.invoked_ns,
                returned: e.returned_ns,
            }),
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
        let h = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(1, acq("b"), granted(2), 5, 15),
        ];
        let err = check(&h).unwrap_err();
        // One of them was placed; the other could not be.
        assert_eq!(err.longest_prefix.len(), 1);
        assert_eq!(err.unplaced.len(), 1);
        assert_ne!(err.longest_prefix[0], err.unplaced[0]);
        let text = err.to_string();
        assert!(text.contains("Longest linearizable prefix: 1 operations"), "{text}");
        assert!(text.contains("Could not place next"), "{text}");

        // With a release between them (in real time) it is fine.
        let ok = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(0, rel("a"), Outcome::Released, 11, 12),
            ev(1, acq("b"), granted(2), 13, 15),
        ];
        check(&ok).unwrap();
    }

    #[test]
    fn overlapping_ops_legal_in_one_order_pass() {
        // Client 1's acquire is invoked before client 0's release, but the
        // two overlap, so the release may take effect first.
        let h = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(1, acq("b"), granted(2), 15, 35),
            ev(0, rel("a"), Outcome::Released, 20, 40),
        ];
        check(&h).unwrap();
        // Only that order works: if the acquire returns before the release is
        // invoked, it is a violation.
        let bad = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(1, acq("b"), granted(2), 15, 18),
            ev(0, rel("a"), Outcome::Released, 20, 40),
        ];
        let err = check(&bad).unwrap_err();
        assert_eq!(err.unplaced.first(), Some(&1), "{err}");
        // And the other order's outcomes: acquire first sees Held, release
        // afterwards still releases.
        let other = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(1, acq("b"), held("a"), 15, 35),
            ev(0, rel("a"), Outcome::Released, 20, 40),
        ];
        check(&other).unwrap();
    }

    #[test]
    fn stale_held_after_release_violates() {
        let h = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(0, rel("a"), Outcome::Released, 20, 30),
            ev(1, acq("b"), held("a"), 40, 50),
        ];
        let err = check(&h).unwrap_err();
        assert_eq!(err.longest_prefix, vec![0, 1]);
        assert_eq!(err.unplaced, vec![2]);
        assert!(err.to_string().contains("Lock state after it: free"), "{err}");
        // If the Held overlaps the release, it could have been read first.
        let ok = vec![
            ev(0, acq("a"), granted(1), 0, 10),
            ev(0, rel("a"), Outcome::Released, 20, 30),
            ev(1, acq("b"), held("a"), 25, 50),
        ];
        check(&ok).unwrap();
    }

    #[test]
    fn tokens_must_grow() {
        let h = vec![
            ev(0, acq("a"), granted(10), 0, 10),
            ev(0, rel("a"), Outcome::Released, 20, 30),
            ev(1, acq("b"), granted(5), 40, 50),
        ];
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
        let reacquire = vec![
            ev(0, acq("a"), granted(10), 0, 10),
            ev(0, acq("a"), granted(10), 20, 30),
        ];
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
        let concurrent = vec![
            ev(0, acq("a"), granted(10), 0, 50),
            ev(1, acq("b"), granted(5), 10, 60),
        ];
        check_tokens_grow(&concurrent).unwrap();
        // A same-token "re-acquire" by a different holder is a new grant.
        let stolen = vec![
            ev(0, acq("a"), granted(10), 0, 10),
            ev(1, acq("b"), granted(10), 20, 30),
        ];
        assert!(check_tokens_grow(&stolen).is_err());
        // Two different holders were both granted 10 earlier: whoever gets 10
        // later conflicts with one of them.
        let twice = vec![
            ev(0, acq("a"), granted(10), 0, 10),
            ev(1, acq("b"), granted(10), 0, 10),
            ev(0, acq("a"), granted(10), 20, 30),
        ];
        assert!(check_tokens_grow(&twice).is_err());
    }

    #[test]
    fn unknown_outcomes() {
        // The unknown acquire by "a" took effect: "b" later sees it held.
        let took_effect = vec![
            ev(0, acq("a"), Outcome::Unknown, 0, 0),
            ev(1, acq("b"), held("a"), 100, 110),
            ev(1, rel("b"), not_owner("a"), 120, 130),
        ];
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
        let too_early = vec![
            ev(1, acq("b"), held("a"), 0, 10),
            ev(0, acq("a"), Outcome::Unknown, 20, 0),
        ];
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
        let first_return = h
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Granted { .. }))
            .map(|e| e.returned_ns)
            .min()
            .unwrap();
        h.iter()
            .rposition(|e| {
                matches!(e.outcome, Outcome::Granted { .. }) && e.invoked_ns > first_return
            })
            .unwrap()
    }

    #[test]
    fn randomized_correct_lock_passes_and_corruption_fails() {
        let h = simulate(0x5eed, 3, 3000, 0);
        assert_eq!(h.len(), 3000);
        // The generated history exercises every outcome.
        for probe in [granted(0), held(""), Outcome::Released, Outcome::NotHeld, not_owner("")] {
            assert!(
                h.iter().any(|e| std::mem::discriminant(&e.outcome)
                    == std::mem::discriminant(&probe)),
                "no {probe:?} generated"
            );
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
