//! The YAML text as a small tree of nodes that remember their line and column.
//! Built from saphyr-parser's events; a syntax error stops the build (`syntax.rs` places it).
//! Aliases are expanded into copies (bounded, against "billion laughs"), so later stages see a
//! plain tree; copies keep their anchor's ids and positions, which is where the text is.

use super::syntax::SyntaxError;
use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};
use std::collections::HashMap;

/// More nodes than any real sidecar config has; reached only by alias bombs.
const MAX_NODES: usize = 100_000;

/// One YAML node. `id` is unique per written node (alias copies share it) and names the node
/// when an error removes it; `line` and `col` are 1-based.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) id: usize,
    pub(crate) line: usize,
    pub(crate) col: usize,
    pub(crate) kind: Kind,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Scalar(Scalar),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) key: Node,
    pub(crate) value: Node,
}

/// A scalar's text, and whether YAML's core schema may read it as null, bool or number:
/// only plain (unquoted, untagged) scalars may, so `"5"` stays a string.
#[derive(Debug, Clone)]
pub(crate) struct Scalar {
    pub(crate) text: String,
    pub(crate) plain: bool,
}

/// What a scalar means under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Resolved {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

/// Parses one YAML document. `Ok(None)`: the text has no document (empty, or only comments).
pub(crate) fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) =
            event.map_err(|e| SyntaxError::from_parser(text, &e, &builder.open_spans()))?;
        builder.event(event, span)?;
    }
    Ok(builder.root)
}

// === impl Node ===

impl Node {
    pub(crate) fn scalar(&self) -> Option<&Scalar> {
        match &self.kind {
            Kind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    /// Whether the node is a null scalar (`~`, `null`, or nothing at all after `key:`).
    pub(crate) fn is_null(&self) -> bool {
        self.scalar().is_some_and(|s| s.resolve() == Resolved::Null)
    }

    /// Nodes in this subtree, keys included.
    pub(crate) fn count(&self) -> usize {
        1 + match &self.kind {
            Kind::Scalar(_) => 0,
            Kind::Seq(items) => items.iter().map(Node::count).sum(),
            Kind::Map(entries) => entries.iter().map(|e| e.key.count() + e.value.count()).sum(),
        }
    }

    /// The text of every scalar in the tree, keys included.
    pub(crate) fn scalar_texts(&self) -> Vec<&str> {
        let mut texts = Vec::new();
        let mut stack = vec![self];
        while let Some(node) = stack.pop() {
            match &node.kind {
                Kind::Scalar(s) => texts.push(s.text.as_str()),
                Kind::Seq(items) => stack.extend(items),
                Kind::Map(entries) => stack.extend(entries.iter().flat_map(|e| [&e.key, &e.value])),
            }
        }
        texts
    }
}

// === impl Scalar ===

impl Scalar {
    pub(crate) fn resolve(&self) -> Resolved {
        if !self.plain {
            return Resolved::Str;
        }
        let t = self.text.as_str();
        match t {
            "" | "~" | "null" | "Null" | "NULL" => return Resolved::Null,
            "true" | "True" | "TRUE" => return Resolved::Bool(true),
            "false" | "False" | "FALSE" => return Resolved::Bool(false),
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
                return Resolved::Float(f64::INFINITY);
            }
            "-.inf" | "-.Inf" | "-.INF" => return Resolved::Float(f64::NEG_INFINITY),
            ".nan" | ".NaN" | ".NAN" => return Resolved::Float(f64::NAN),
            _ => {}
        }
        if let Some(int) = parse_int(t) {
            return Resolved::Int(int);
        }
        // The core schema's float: digits with a dot and/or an exponent, and nothing else
        // (Rust's parser alone would also take "inf" and "NaN").
        let float_chars = t.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
        if float_chars
            && t.bytes().any(|b| b.is_ascii_digit())
            && let Ok(f) = t.parse::<f64>()
        {
            return Resolved::Float(f);
        }
        Resolved::Str
    }
}

fn parse_int(t: &str) -> Option<i128> {
    let digits_in = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    if let Some(hex) = t.strip_prefix("0x") {
        return digits_in(hex, 16).then(|| i128::from_str_radix(hex, 16).ok())?;
    }
    if let Some(oct) = t.strip_prefix("0o") {
        return digits_in(oct, 8).then(|| i128::from_str_radix(oct, 8).ok())?;
    }
    let unsigned = t.strip_prefix(['-', '+']).unwrap_or(t);
    digits_in(unsigned, 10).then(|| t.parse().ok())?
}

// === impl Builder ===

/// Turns the event stream into nodes: a stack of open collections, and the anchors seen so far.
#[derive(Debug, Default)]
struct Builder {
    open: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    next_id: usize,
    nodes: usize,
}

#[derive(Debug)]
struct Open {
    node: Node,
    anchor: usize,
    pending_key: Option<Node>,
    /// Where the collection's start event is in the text: a syntax error may point there.
    span: Span,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let (line, col) = (span.start.line(), span.start.col() + 1);
        let error = |message: &str| SyntaxError::new(line, col, message);
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(error("a second document; the configuration is one document"));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                if let Some(tag) = tag.as_ref().filter(|t| !is_core_tag(t)) {
                    return Err(error(&format!("unsupported tag {tag}")));
                }
                // `!!str 5` is the string "5"; other core tags leave the schema to decide.
                let plain = style == ScalarStyle::Plain && tag.is_none_or(|t| t.suffix != "str");
                let scalar = Scalar { text: text.into_owned(), plain };
                let node = self.node(line, col, Kind::Scalar(scalar))?;
                self.finish(node, anchor);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let kind = match event {
                    Event::SequenceStart(..) => Kind::Seq(Vec::new()),
                    _ => Kind::Map(Vec::new()),
                };
                let node = self.node(line, col, kind)?;
                self.open.push(Open { node, anchor, pending_key: None, span });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let open = self.open.pop().expect("the parser balances start and end events");
                self.finish(open.node, open.anchor);
            }
            Event::Alias(anchor) => {
                let copy =
                    self.anchors.get(&anchor).cloned().ok_or_else(|| error("unknown alias"))?;
                self.nodes += copy.count();
                if self.nodes > MAX_NODES {
                    return Err(error("aliases expand to too many nodes"));
                }
                self.finish(copy, 0);
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    /// The spans of the collections still open, outermost first.
    fn open_spans(&self) -> Vec<Span> {
        self.open.iter().map(|open| open.span).collect()
    }

    fn node(&mut self, line: usize, col: usize, kind: Kind) -> Result<Node, SyntaxError> {
        self.next_id += 1;
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError::new(line, col, "the document has too many nodes"));
        }
        Ok(Node { id: self.next_id, line, col, kind })
    }

    /// Places a complete node: into the open collection, or as the document's root.
    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(parent) = self.open.last_mut() else {
            self.root = Some(node);
            return;
        };
        match &mut parent.node.kind {
            Kind::Seq(items) => items.push(node),
            Kind::Map(entries) => match parent.pending_key.take() {
                None => parent.pending_key = Some(node),
                Some(key) => entries.push(Entry { key, value: node }),
            },
            Kind::Scalar(_) => unreachable!("only collections are open"),
        }
    }
}

/// `!!str`, `!!int`, ...: tags that only restate what the core schema means anyway.
fn is_core_tag(tag: &Tag) -> bool {
    tag.is_yaml_core_schema()
        && ["str", "int", "float", "bool", "null", "map", "seq"].contains(&tag.suffix.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Resolved {
        let root = parse(&format!("k: {text}\n")).unwrap().unwrap();
        let Kind::Map(entries) = root.kind else { panic!("a mapping") };
        entries[0].value.scalar().unwrap().resolve()
    }

    #[test]
    fn scalars_resolve_by_the_yaml_1_2_core_schema() {
        assert_eq!(resolve(""), Resolved::Null);
        assert_eq!(resolve("~"), Resolved::Null);
        assert_eq!(resolve("true"), Resolved::Bool(true));
        assert_eq!(resolve("42"), Resolved::Int(42));
        assert_eq!(resolve("-7"), Resolved::Int(-7));
        assert_eq!(resolve("0x1F"), Resolved::Int(31));
        assert_eq!(resolve("0.5"), Resolved::Float(0.5));
        assert_eq!(resolve("1e3"), Resolved::Float(1000.0));
        // YAML 1.1's booleans and other near-numbers stay strings.
        for text in ["yes", "off", "1_000", "5s", "\"5\"", "'true'", "inf", "!!str 5"] {
            assert_eq!(resolve(text), Resolved::Str, "{text}");
        }
    }

    #[test]
    fn positions_are_one_based_and_aliases_copy_their_anchor() {
        let root = parse("a: &x [1]\nb: *x\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else { panic!("a mapping") };
        assert_eq!((entries[0].key.line, entries[0].key.col), (1, 1));
        assert_eq!(
            (entries[1].value.line, entries[1].value.id),
            (entries[0].value.line, entries[0].value.id)
        );
        let err = parse("a: [1\n").unwrap_err();
        assert_eq!((err.line, err.col), (1, 4), "at the '[' left open");
    }
}
