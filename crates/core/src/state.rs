//! The replicated state machine.
//!
//! [`State::apply`] is the only way the state changes. It is deterministic
//! (time comes from the entry), validates every command, and returns, next to
//! the answer, the exact key/value [`Change`]s it made, so the coordinator can
//! persist them in the same atomic write as `last_applied` without knowing
//! anything about the domain.
//!
//! Key space (values are JSON):
//! * `lock/<destination>`  -> [`LockView`]
//! * `dedup/<request id>`  -> [`DedupEntry`]

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::command::{Command, LockView, Request, Response};
use crate::names::{validate_name, validate_text, MAX_REASON_LEN};

/// How long a request id is remembered. A client retries for seconds, so
/// ten minutes is far beyond any retry, and bounds the table.
pub const DEDUP_TTL_MS: i64 = 10 * 60 * 1000;
/// At most this many expired ids are dropped per applied entry, so one
/// entry's apply cost stays bounded.
const DEDUP_EXPIRE_BATCH: usize = 64;

const LOCK_PREFIX: &str = "lock/";
const DEDUP_PREFIX: &str = "dedup/";

/// One persisted key changed by `apply`: `Some(value)` = put, `None` = delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    pub at_ms: i64,
    pub response: Response,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("state key `{key}` has a value that does not decode: {source}")]
    BadValue { key: String, source: serde_json::Error },
    #[error("state key `{0}` is not one Fleet writes")]
    UnknownKey(String),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    locks: BTreeMap<String, LockView>,
    dedup: BTreeMap<String, DedupEntry>,
    /// (at_ms, id) of every dedup entry: the expiry order. Derived, never persisted.
    dedup_order: BTreeSet<(i64, String)>,
}

impl State {
    /// Rebuild the state from persisted key/value pairs (a data dir or a snapshot).
    pub fn load<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, LoadError>
    where
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut state = State::default();
        for (key, value) in pairs {
            let key = key.as_ref();
            let bad = |source| LoadError::BadValue { key: key.to_string(), source };
            if let Some(dest) = key.strip_prefix(LOCK_PREFIX) {
                let lock: LockView = serde_json::from_slice(value.as_ref()).map_err(bad)?;
                state.locks.insert(dest.to_string(), lock);
            } else if let Some(id) = key.strip_prefix(DEDUP_PREFIX) {
                let entry: DedupEntry = serde_json::from_slice(value.as_ref()).map_err(bad)?;
                state.dedup_order.insert((entry.at_ms, id.to_string()));
                state.dedup.insert(id.to_string(), entry);
            } else {
                return Err(LoadError::UnknownKey(key.to_string()));
            }
        }
        Ok(state)
    }

    /// Every persisted key/value pair, in key order (what a snapshot holds).
    pub fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.locks.len() + self.dedup.len());
        for (dest, lock) in &self.locks {
            out.push((format!("{LOCK_PREFIX}{dest}"), encode(lock)));
        }
        for (id, entry) in &self.dedup {
            out.push((format!("{DEDUP_PREFIX}{id}"), encode(entry)));
        }
        out
    }

    pub fn lock(&self, destination: &str) -> Option<&LockView> {
        self.locks.get(destination)
    }

    pub fn locks(&self) -> impl Iterator<Item = &LockView> {
        self.locks.values()
    }

    /// Apply one committed entry at log `index`.
    pub fn apply(&mut self, index: u64, req: &Request) -> (Response, Vec<Change>) {
        let mut changes = Vec::new();
        self.expire_dedup(req.at_ms, &mut changes);

        if let Some(id) = &req.request_id {
            if let Some(seen) = self.dedup.get(id) {
                return (seen.response.clone(), changes);
            }
        }

        let response = match &req.command {
            Command::AcquireLock { destination, holder, reason } => {
                self.acquire(index, req.at_ms, destination, holder, reason, &mut changes)
            }
            Command::ReleaseLock { destination, holder } => self.release(destination, holder, &mut changes),
        };

        if let Some(id) = &req.request_id {
            let entry = DedupEntry { at_ms: req.at_ms, response: response.clone() };
            changes.push(Change { key: format!("{DEDUP_PREFIX}{id}"), value: Some(encode(&entry)) });
            self.dedup_order.insert((req.at_ms, id.clone()));
            self.dedup.insert(id.clone(), entry);
        }
        (response, changes)
    }

    fn acquire(
        &mut self,
        index: u64,
        at_ms: i64,
        destination: &str,
        holder: &str,
        reason: &str,
        changes: &mut Vec<Change>,
    ) -> Response {
        if let Err(e) = validate_name("destination", destination)
            .and_then(|_| validate_text("reason", reason, MAX_REASON_LEN))
        {
            return Response::Invalid { reason: e.to_string() };
        }
        if holder.is_empty() {
            return Response::Invalid { reason: "lock holder is empty".into() };
        }
        match self.locks.get(destination) {
            Some(lock) if lock.holder == holder => Response::Granted { lock: lock.clone() },
            Some(lock) => Response::Held { lock: lock.clone() },
            None => {
                let lock = LockView {
                    destination: destination.to_string(),
                    holder: holder.to_string(),
                    reason: reason.to_string(),
                    since_ms: at_ms,
                    fencing_token: index,
                };
                changes.push(Change { key: format!("{LOCK_PREFIX}{destination}"), value: Some(encode(&lock)) });
                self.locks.insert(destination.to_string(), lock.clone());
                Response::Granted { lock }
            }
        }
    }

    fn release(&mut self, destination: &str, holder: &str, changes: &mut Vec<Change>) -> Response {
        if let Err(e) = validate_name("destination", destination) {
            return Response::Invalid { reason: e.to_string() };
        }
        match self.locks.get(destination) {
            None => Response::NotHeld { destination: destination.to_string() },
            Some(lock) if lock.holder != holder => Response::NotOwner { lock: lock.clone() },
            Some(_) => {
                self.locks.remove(destination);
                changes.push(Change { key: format!("{LOCK_PREFIX}{destination}"), value: None });
                Response::Released { destination: destination.to_string() }
            }
        }
    }

    fn expire_dedup(&mut self, now_ms: i64, changes: &mut Vec<Change>) {
        for _ in 0..DEDUP_EXPIRE_BATCH {
            let Some((at, id)) = self.dedup_order.first().cloned() else { break };
            if now_ms - at < DEDUP_TTL_MS {
                break;
            }
            self.dedup_order.pop_first();
            self.dedup.remove(&id);
            changes.push(Change { key: format!("{DEDUP_PREFIX}{id}"), value: None });
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state values are plain structs; serializing them cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: Option<&str>, at_ms: i64, command: Command) -> Request {
        Request { request_id: id.map(str::to_string), at_ms, command }
    }
    fn acquire(dest: &str, holder: &str) -> Command {
        Command::AcquireLock { destination: dest.into(), holder: holder.into(), reason: "r".into() }
    }
    fn release(dest: &str, holder: &str) -> Command {
        Command::ReleaseLock { destination: dest.into(), holder: holder.into() }
    }

    /// What kind of answer a step must produce.
    #[derive(Debug, PartialEq)]
    enum Want {
        Granted(u64),
        Held(&'static str),
        Released,
        NotHeld,
        NotOwner(&'static str),
        Invalid,
    }

    fn kind(r: &Response) -> Want {
        match r {
            Response::Granted { lock } => Want::Granted(lock.fencing_token),
            Response::Held { lock } => Want::Held(Box::leak(lock.holder.clone().into_boxed_str())),
            Response::Released { .. } => Want::Released,
            Response::NotHeld { .. } => Want::NotHeld,
            Response::NotOwner { lock } => Want::NotOwner(Box::leak(lock.holder.clone().into_boxed_str())),
            Response::Invalid { .. } => Want::Invalid,
            Response::Noop => panic!("noop"),
        }
    }

    #[test]
    fn lock_table() {
        // (log index, command, expected answer), applied in order to one state.
        let steps: Vec<(u64, Command, Want)> = vec![
            (1, acquire("web", "alice"), Want::Granted(1)),
            (2, acquire("web", "alice"), Want::Granted(1)), // idempotent for the holder
            (3, acquire("web", "bob"), Want::Held("alice")),
            (4, release("web", "bob"), Want::NotOwner("alice")),
            (5, release("db", "bob"), Want::NotHeld),
            (6, release("web", "alice"), Want::Released),
            (7, release("web", "alice"), Want::NotHeld),
            (8, acquire("web", "bob"), Want::Granted(8)), // token = index of the grant
            (9, acquire("Bad Name", "bob"), Want::Invalid),
            (10, acquire("db", ""), Want::Invalid),
            (11, acquire("db", "alice"), Want::Granted(11)),
        ];
        let mut s = State::default();
        for (index, cmd, want) in steps {
            let (got, _) = s.apply(index, &req(None, 0, cmd.clone()));
            assert_eq!(kind(&got), want, "index {index}: {cmd:?}");
        }
        assert_eq!(s.locks().count(), 2);
    }

    #[test]
    fn request_ids_apply_once() {
        let mut s = State::default();
        let (first, _) = s.apply(1, &req(Some("c1-1"), 0, acquire("web", "alice")));
        let (_, _) = s.apply(2, &req(Some("c1-2"), 0, release("web", "alice")));
        // The retried acquire must not re-grant the lock that was released since.
        let (again, changes) = s.apply(3, &req(Some("c1-1"), 0, acquire("web", "alice")));
        assert_eq!(first, again);
        assert!(changes.is_empty());
        assert!(s.lock("web").is_none());
    }

    #[test]
    fn dedup_entries_expire_after_ttl() {
        let mut s = State::default();
        s.apply(1, &req(Some("old"), 0, acquire("web", "alice")));
        let (_, changes) = s.apply(2, &req(Some("new"), DEDUP_TTL_MS, release("web", "alice")));
        assert!(changes.iter().any(|c| c.key == "dedup/old" && c.value.is_none()));
        assert!(!s.dedup.contains_key("old"));
        assert!(s.dedup.contains_key("new"));
    }

    #[test]
    fn changes_replayed_into_load_rebuild_the_same_state() {
        let mut s = State::default();
        let mut kv: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let cmds = [acquire("a", "x"), acquire("b", "y"), release("a", "x"), acquire("c", "x")];
        for (i, c) in cmds.into_iter().enumerate() {
            let (_, changes) = s.apply(i as u64 + 1, &req(Some(&format!("r{i}")), 5, c));
            for ch in changes {
                match ch.value {
                    Some(v) => kv.insert(ch.key, v),
                    None => kv.remove(&ch.key),
                };
            }
        }
        assert_eq!(State::load(kv.clone()).unwrap(), s);
        assert_eq!(State::load(s.dump()).unwrap(), s);
        assert!(State::load([("nope/x", b"{}")]).is_err());
    }
}
