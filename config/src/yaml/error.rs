//! The error that travels through serde while the tree is deserialized.
//! It is born without a place (serde's visitors know no positions) and picks up, on its way
//! out, where to report it (`at`) and which node to remove before trying again (`target`).

use super::tree::Node;
use std::fmt;

/// A value problem found while deserializing, plus what the retry loop needs to go on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeError {
    pub(crate) message: String,
    pub(crate) expected: Option<String>,
    /// A required field that is absent: reported at the mapping that lacks it.
    pub(crate) missing: Option<&'static str>,
    pub(crate) at: Option<At>,
    pub(crate) target: Option<Target>,
}

/// Where a problem is reported: the field path and the node's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct At {
    pub(crate) path: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
}

/// The map entry or list item to remove so that the next attempt gets past this problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) id: usize,
    pub(crate) path: String,
}

// === impl DeError ===

impl DeError {
    pub(crate) fn new(message: impl Into<String>, expected: Option<String>) -> Self {
        DeError { message: message.into(), expected, missing: None, at: None, target: None }
    }

    pub(crate) fn of_type(got: &Node, noun: &str, expected: impl Into<String>) -> Self {
        let message = match got.is_null() {
            true => "empty value".to_owned(),
            false => format!("{} is not {noun}", describe_node(got)),
        };
        DeError::new(message, Some(expected.into()))
    }

    /// Sets where to report the problem, unless a deeper node already did. A missing field is
    /// reported at its mapping, under the field's own path.
    pub(crate) fn report_at(mut self, node: &Node, path: &str) -> Self {
        if self.at.is_none() {
            let path = match self.missing {
                Some(field) => super::key_path(path, field),
                None => path.to_owned(),
            };
            self.at = Some(At { path, line: node.line, col: node.col });
        }
        self
    }

    /// Sets the report position (if unset) and the node to remove (if unset).
    pub(crate) fn remove(self, node: &Node, path: &str) -> Self {
        let mut e = self.report_at(node, path);
        e.target.get_or_insert_with(|| Target { id: node.id, path: path.to_owned() });
        e
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match &self.expected {
            Some(expected) => write!(f, " (expected {expected})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for DeError {}

impl serde::de::Error for DeError {
    /// `try_from` errors arrive here as text; ours end in `(expected ...)`, which is split off
    /// again so that every problem has the same shape.
    fn custom<T: fmt::Display>(msg: T) -> Self {
        let text = msg.to_string();
        match text.strip_suffix(')').and_then(|t| t.split_once(" (expected ")) {
            Some((message, expected)) => DeError::new(message, Some(expected.to_owned())),
            None => DeError::new(text, None),
        }
    }

    fn invalid_type(unexp: serde::de::Unexpected<'_>, exp: &dyn serde::de::Expected) -> Self {
        let message = format!("{} is not valid here", describe_unexpected(&unexp));
        DeError::new(message, Some(describe_expected(&exp.to_string())))
    }

    fn invalid_value(unexp: serde::de::Unexpected<'_>, exp: &dyn serde::de::Expected) -> Self {
        let message = format!("{} is not valid", describe_unexpected(&unexp));
        DeError::new(message, Some(describe_expected(&exp.to_string())))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(format!("unknown value {variant:?}"), Some(one_of(expected)))
    }

    fn unknown_field(_field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new("unknown field", Some(one_of(expected)))
    }

    fn missing_field(field: &'static str) -> Self {
        DeError { missing: Some(field), ..DeError::new("required field is missing", None) }
    }

    fn duplicate_field(_field: &'static str) -> Self {
        DeError::new("duplicate key", Some("each key once".to_owned()))
    }
}

/// `one of: a, b, c`, the expectation of every closed set of names.
pub(crate) fn one_of(names: &[&str]) -> String {
    format!("one of: {}", names.join(", "))
}

/// A node as the user wrote it, for "X is not Y" messages.
pub(crate) fn describe_node(node: &Node) -> String {
    match &node.kind {
        // Numbers and booleans as written; text quoted, like the values in other messages.
        super::tree::Kind::Scalar(s) if s.resolve() != super::tree::Resolved::Str => s.text.clone(),
        super::tree::Kind::Scalar(s) => format!("{:?}", s.text),
        super::tree::Kind::Seq(_) => "a list".to_owned(),
        super::tree::Kind::Map(_) => "a mapping".to_owned(),
    }
}

fn describe_unexpected(unexp: &serde::de::Unexpected<'_>) -> String {
    use serde::de::Unexpected as U;
    match unexp {
        U::Str(s) => format!("{s:?}"),
        U::Unsigned(n) => n.to_string(),
        U::Signed(n) => n.to_string(),
        U::Float(n) => n.to_string(),
        U::Bool(b) => b.to_string(),
        U::Unit | U::Option => "an empty value".to_owned(),
        U::Seq => "a list".to_owned(),
        U::Map => "a mapping".to_owned(),
        other => other.to_string(),
    }
}

/// Turns serde's Rust-flavoured expectations ("a nonzero u32", "struct Timeouts") into the
/// user's words. Our own visitors already speak them and pass through unchanged.
pub(crate) fn describe_expected(exp: &str) -> String {
    let (low, ty) = match exp.strip_prefix("a nonzero ") {
        Some(ty) => (1, ty),
        None => (0, exp),
    };
    let high = match ty {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    if let Some(high) = high {
        return whole_number(low, high.into());
    }
    match exp {
        "f32" | "f64" => "a number, e.g. 0.5".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        _ if exp.starts_with("struct ") => "a mapping".to_owned(),
        _ => exp.to_owned(),
    }
}

/// `a whole number from 0 to 255`, or `a whole number >= 1` when the top is just the type's.
pub(crate) fn whole_number(low: i128, high: i128) -> String {
    match high >= i128::from(u64::MAX) {
        true => format!("a whole number >= {low}"),
        false => format!("a whole number from {low} to {high}"),
    }
}
