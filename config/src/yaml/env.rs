//! `${VAR}` in a value is replaced by the environment variable `VAR`, so secrets (a Redis
//! password, a PostgreSQL URL, a collector's token) come from the container's environment (a
//! Kubernetes Secret) instead of the ConfigMap. `${VAR:-default}` gives a default for an unset
//! or empty variable; `$${` writes a literal `${`. An unset variable without a default is a
//! problem at the value's line and column. Keys are never expanded.

use super::tree::{Kind, Node};
use super::{index_path, key_path};

/// A `${VAR}` that could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unset {
    pub(crate) path: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
    pub(crate) message: String,
}

/// Expands every value scalar under `node`, asking `lookup` for each variable. A value that
/// cannot be expanded is noted in `unset` and taken out of the tree (as if not written), so
/// its field's own check does not report the same value again; true when `node` itself is.
pub(crate) fn expand(
    node: &mut Node,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<Unset>,
) -> bool {
    match &mut node.kind {
        Kind::Scalar(scalar) => {
            if !scalar.text.contains('$') {
                return false;
            }
            match expand_text(&scalar.text, lookup) {
                Ok(text) => {
                    scalar.text = text;
                    false
                }
                Err(message) => {
                    let (line, col) = (node.line, node.col);
                    unset.push(Unset { path: path.to_owned(), line, col, message });
                    true
                }
            }
        }
        Kind::Seq(items) => {
            let mut i = 0;
            items.retain_mut(|item| {
                let failed = expand(item, &index_path(path, i), lookup, unset);
                i += 1;
                !failed
            });
            false
        }
        Kind::Map(entries) => {
            entries.retain_mut(|entry| {
                let key = entry.key.scalar().map(|s| s.text.clone()).unwrap_or_default();
                !expand(&mut entry.value, &key_path(path, &key), lookup, unset)
            });
            false
        }
    }
}

/// `text` with each `${VAR}` replaced, or what is wrong with it.
fn expand_text(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            continue;
        }
        let Some(after) = rest.strip_prefix("${") else {
            out.push('$');
            rest = &rest[1..];
            continue;
        };
        let Some(end) = after.find('}') else {
            return Err("has a ${ with no closing }".into());
        };
        let (name, default) = match after[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&after[..end], None),
        };
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("${{{name}}} is not an environment variable's name"));
        }
        // as the shell does: `:-` covers unset and empty, a plain `${VAR}` takes an empty value
        match (lookup(name), default) {
            (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "REDIS_PASSWORD" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_defaults_and_literal_dollars() {
        let cases = [
            ("redis://:${REDIS_PASSWORD}@redis:6379", Ok("redis://:s3cret@redis:6379")),
            ("${MISSING:-8080}", Ok("8080")),
            ("${EMPTY:-fallback}", Ok("fallback")),
            ("a${EMPTY}b", Ok("ab")),
            ("price: $5 and $${NOT_A_VAR}", Ok("price: $5 and ${NOT_A_VAR}")),
            ("${MISSING}", Err("environment variable MISSING is not set")),
            ("${REDIS_PASSWORD", Err("has a ${ with no closing }")),
            ("${1BAD}", Err("${1BAD} is not an environment variable's name")),
        ];
        for (text, expected) in cases {
            let got = expand_text(text, &env);
            assert_eq!(got.as_deref().map_err(String::as_str), expected, "{text}");
        }
    }
}
