//! Tidying the tree before it is deserialized: repeated keys are reported and dropped (YAML
//! forbids them, and silently keeping one would hide a typo), and `<<` merge keys are applied,
//! so that shared settings written once with an anchor reach every mapping that merges them.

use super::tree::{Kind, Node};
use super::{index_path, key_path};
use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;

/// A key given twice in one mapping. YAML forbids it; the later entry is dropped so that the
/// rest of the file can still be checked.
#[derive(Debug, Clone)]
pub(crate) struct Duplicate {
    pub(crate) path: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
    pub(crate) first_line: usize,
}

/// Drops repeated keys (reporting each) and applies `<<` merge keys, all the way down.
/// Merging follows YAML's merge-key convention: keys written in the mapping win over merged
/// ones, and an earlier merge source wins over a later one.
pub(crate) fn tidy(node: &mut Node, path: &str, duplicates: &mut Vec<Duplicate>) {
    let entries = match &mut node.kind {
        Kind::Scalar(_) => return,
        Kind::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                tidy(item, &index_path(path, i), duplicates);
            }
            return;
        }
        Kind::Map(entries) => entries,
    };
    let mut seen = HashMap::new();
    let mut kept = Vec::with_capacity(entries.len());
    let mut sources = Vec::new();
    for entry in entries.drain(..) {
        let Some(key) = entry.key.scalar() else {
            kept.push(entry);
            continue;
        };
        if key.plain && key.text == "<<" && mergeable(&entry.value) {
            sources.push(entry.value);
            continue;
        }
        match seen.entry(key.text.clone()) {
            Slot::Occupied(first) => duplicates.push(Duplicate {
                path: key_path(path, first.key()),
                line: entry.key.line,
                col: entry.key.col,
                first_line: *first.get(),
            }),
            Slot::Vacant(slot) => {
                slot.insert(entry.key.line);
                kept.push(entry);
            }
        }
    }
    for source in sources {
        let maps = match source.kind {
            Kind::Seq(items) => items,
            _ => vec![source],
        };
        for entry in maps.into_iter().flat_map(|m| match m.kind {
            Kind::Map(entries) => entries,
            _ => Vec::new(),
        }) {
            let key = entry.key.scalar().map(|s| s.text.clone()).unwrap_or_default();
            if let Slot::Vacant(slot) = seen.entry(key) {
                slot.insert(entry.key.line);
                kept.push(entry);
            }
        }
    }
    for entry in &mut kept {
        let key = entry.key.scalar().map_or("?", |s| s.text.as_str());
        let child = key_path(path, key);
        tidy(&mut entry.value, &child, duplicates);
    }
    *entries = kept;
}

/// A merge key's value: a mapping, or a list of mappings. Anything else stays an ordinary
/// entry, so that it is reported as an unknown field instead of vanishing.
fn mergeable(value: &Node) -> bool {
    match &value.kind {
        Kind::Map(_) => true,
        Kind::Seq(items) => items.iter().all(|i| matches!(i.kind, Kind::Map(_))),
        Kind::Scalar(_) => false,
    }
}
