//! YAML to typed config, reporting every problem with its position instead of the first.
//! serde stops at the first bad value, so `deserialize` retries: it notes the problem, removes
//! the offending entry from the tree, and deserializes again until the rest gets through.
//! Nearly every field has a default, so removing a bad value lets everything else be checked.
#![allow(
    clippy::result_large_err,
    reason = "a DeError ends an attempt; its size costs nothing measurable in a config load"
)]

mod access;
mod de;
pub(crate) mod env;
mod error;
mod syntax;
mod tidy;
mod tree;

pub(crate) use error::DeError;
pub(crate) use tidy::tidy;
pub(crate) use tree::{Kind, Node, parse};

use serde::Deserialize;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// What the attempts share: the nodes removed so far, and the problems noted on the way.
#[derive(Debug, Default)]
pub(crate) struct Session {
    removed: RefCell<BTreeMap<usize, String>>,
    noted: RefCell<Vec<DeError>>,
}

/// `parent.key`, or `key` at the top.
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    match parent.is_empty() {
        true => key.to_owned(),
        false => format!("{parent}.{key}"),
    }
}

/// `parent[index]`.
pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Deserializes `T` from the tree, removing bad nodes until it succeeds. Returns the value
/// (when the top level itself was usable), every problem found (each with `at` set), and the
/// paths of the removed nodes, whose stand-in defaults later checks should not judge.
pub(crate) fn deserialize<T>(root: &Node) -> (Option<T>, Vec<DeError>, Vec<String>)
where
    T: for<'de> Deserialize<'de>,
{
    let session = Session::default();
    let mut value = None;
    // Every failed attempt removes one more node, so this many attempts always suffice.
    for _ in 0..=root.count() {
        match T::deserialize(de::De::new(root, String::new(), &session)) {
            Ok(v) => {
                value = Some(v);
                break;
            }
            Err(e) => {
                let e = e.report_at(root, "");
                let target = e.target.clone();
                session.note_unless_consequence(e);
                match target {
                    Some(t) if t.id != root.id && session.remove(t.id, t.path.clone()) => {}
                    _ => break,
                }
            }
        }
    }
    let removed = session.removed.into_inner().into_values().collect();
    (value, session.noted.into_inner(), removed)
}

// === impl Session ===

impl Session {
    pub(crate) fn is_removed(&self, id: usize) -> bool {
        self.removed.borrow().contains_key(&id)
    }

    pub(crate) fn note(&self, e: DeError) {
        self.noted.borrow_mut().push(e);
    }

    /// A required field that is missing only because we removed its bad value was reported
    /// already, as that bad value.
    fn note_unless_consequence(&self, e: DeError) {
        let ours = e.missing.is_some()
            && e.at
                .as_ref()
                .is_some_and(|at| self.removed.borrow().values().any(|p| *p == at.path));
        if !ours {
            self.note(e);
        }
    }

    /// False when the node was removed before: the loop would not make progress.
    fn remove(&self, id: usize, path: String) -> bool {
        self.removed.borrow_mut().insert(id, path).is_none()
    }
}

/// Where `path` (as `validate` writes it, with indexes into the lists as deserialized) is in
/// the file: the value's position, or the nearest ancestor's when the value is not written.
/// Returns the path with list indexes as written, which differ once an item was removed.
pub(crate) fn locate(root: &Node, path: &str, removed: &[String]) -> (String, usize, usize) {
    let mut node = root;
    let mut done = String::new();
    let mut rest = path;
    loop {
        let step = match &node.kind {
            Kind::Map(entries) => {
                let key_rest = rest.strip_prefix('.').unwrap_or(rest);
                // Keys may contain dots (`payments.prod`): take the longest key that fits.
                entries
                    .iter()
                    .filter(|e| !is_removed_path(&key_path(&done, key_of(e)), removed))
                    .filter_map(|e| {
                        let after = key_rest.strip_prefix(key_of(e))?;
                        let boundary = after.is_empty() || after.starts_with(['.', '[']);
                        boundary
                            .then(|| (key_of(e).len(), &e.value, key_path(&done, key_of(e)), after))
                    })
                    .max_by_key(|(len, ..)| *len)
                    .map(|(_, value, path, after)| (value, path, after))
            }
            Kind::Seq(items) => rest
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(index, after)| Some((index.parse::<usize>().ok()?, after)))
                .and_then(|(live, after)| {
                    let (i, item) = items
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !is_removed_path(&index_path(&done, *i), removed))
                        .nth(live)?;
                    Some((item, index_path(&done, i), after))
                }),
            Kind::Scalar(_) => None,
        };
        match step {
            Some((next, path, after)) if !rest.is_empty() => {
                node = next;
                done = path;
                rest = after;
            }
            _ => return (format!("{done}{rest}"), node.line, node.col),
        }
    }
}

fn key_of(entry: &tree::Entry) -> &str {
    entry.key.scalar().map_or("?", |s| s.text.as_str())
}

fn is_removed_path(path: &str, removed: &[String]) -> bool {
    removed.iter().any(|r| r == path)
}
