//! Layering checks that the compiler does not make: no import cycle
//! between the top-level modules of one crate, and `fleet-core` free of
//! I/O and async runtimes. `cargo xtask lint` runs them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules of the same crate it names
/// through `crate::` paths (submodules count as their top-level module).
pub type ModuleGraph = BTreeMap<String, BTreeSet<String>>;

pub fn module_graph(src: &Path) -> std::io::Result<ModuleGraph> {
    let mut graph = ModuleGraph::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src).unwrap_or(&file).with_extension("");
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let parts: Vec<&str> = match parts.last().map(String::as_str) {
            Some("mod") => parts[..parts.len() - 1].iter().map(String::as_str).collect(),
            _ => parts.iter().map(String::as_str).collect(),
        };
        let Some(top) = parts.first().copied() else { continue };
        if parts.len() == 1 && (top == "lib" || top == "main") {
            continue; // the crate root declares every module
        }
        let text = std::fs::read_to_string(&file)?;
        let names = referenced(&text, "crate::");
        let entry = graph.entry(top.to_string()).or_default();
        entry.extend(names.into_iter().filter(|n| n != top));
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    Ok(graph)
}

fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            out.insert(name);
        }
    }
    // `use crate::{a, b::C}` names several modules at once.
    let mut rest = text;
    while let Some(i) = rest.find("crate::{") {
        rest = &rest[i + "crate::{".len()..];
        let group: String = rest.chars().take_while(|c| *c != '}').collect();
        for item in group.split(',') {
            let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.insert(name);
            }
        }
    }
    out
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Groups of modules that import each other, directly or around a loop
/// (strongly connected components with more than one module).
pub fn cycles(graph: &ModuleGraph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a ModuleGraph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on_stack: BTreeSet::new(), out: vec![] };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// Words that mean I/O or an async runtime in `fleet-core`'s sources.
/// `std::net`'s address types (`IpAddr`, `SocketAddr`) are plain values and
/// validating a manifest's address with them is pure; its sockets and name
/// lookups (`ToSocketAddrs` resolves through DNS) are not.
const CORE_FORBIDDEN: &[&str] = &[
    "tokio",
    "std::fs",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "ToSocketAddrs",
    "std::process",
    "SystemTime::now",
    "Instant::now",
    "std::thread",
];

/// Every forbidden use in fleet-core's sources outside test code, as `file: word`.
pub fn core_impurities(core_src: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for file in rust_files(core_src)? {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        // Test modules may use what they like; they sit at the end of a file.
        let text = text.split("#[cfg(test)]").next().unwrap_or("");
        for word in CORE_FORBIDDEN {
            if text.contains(word) {
                out.push(format!("{}: {word}", file.display()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> ModuleGraph {
        edges.iter().map(|(a, bs)| (a.to_string(), bs.iter().map(|b| b.to_string()).collect())).collect()
    }

    #[test]
    fn finds_direct_and_longer_cycles_and_nothing_in_a_dag() {
        assert!(cycles(&graph(&[("a", &["b"]), ("b", &["c"]), ("c", &[])])).is_empty());
        assert_eq!(cycles(&graph(&[("a", &["b"]), ("b", &["a"])])), vec![vec!["a".to_string(), "b".to_string()]]);
        let three = cycles(&graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &["a"])]));
        assert_eq!(three, vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]]);
    }

    #[test]
    fn reads_single_and_grouped_imports() {
        let names = referenced("use crate::hub::Hub;\nuse crate::{propose::propose, raft_types::Raft};\nlet x = crate::Config;", "crate::");
        assert_eq!(names, ["hub", "propose", "raft_types"].iter().map(|s| s.to_string()).collect());
    }
}
