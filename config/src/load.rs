//! Read, parse, deserialize, validate: one function for `outrigger validate`, startup and
//! reload. Fails with every problem of the file at once, each at its line and column, sorted
//! by position and deduplicated (retries meet some problems more than once), and with the
//! password of any URL they quote as `***`: the problems go to a terminal, a log, CI output.

use crate::error::{LoadError, Problem, Problems};
use crate::model::Config;
use crate::types::{Endpoint, redact};
use crate::validate::{Issue, validate};
use crate::yaml::{self, DeError, Node};
use std::path::Path;

/// What to do about a `${VAR}` that cannot be expanded.
const ENV_EXPECTED: &str = "the variable set in the sidecar's environment (from a Secret), ${VAR:-default}, or $${ for a literal ${";

/// Loads the config at `path`; problems name the file as given.
pub fn load_file(path: &Path) -> Result<Config, LoadError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&file, &text),
        Err(source) => Err(LoadError::Read { file, source }),
    }
}

/// Loads a config from `text`; `file_name` is what problems print as their file.
pub fn load_str(file_name: &str, text: &str) -> Result<Config, LoadError> {
    let Some((root, mut problems)) = tree(file_name, text)? else { return Ok(Config::default()) };
    let (config, found, removed) = yaml::deserialize::<Config>(&root);
    problems.extend(noted(file_name, found));
    if let Some(config) = &config {
        for issue in validate(config) {
            if let Some((path, line, col)) = place(&root, &issue, &removed) {
                problems.push(problem(file_name, path, (line, col), issue.message, issue.expected));
            }
        }
    }
    match (config, problems.is_empty()) {
        (Some(config), true) => Ok(config),
        _ => Err(invalid(text, without_secrets(&root, problems))),
    }
}

/// Loads a `file` discovery source's endpoint list: a YAML sequence of `HOST:PORT`, the same
/// syntax as `discovery.static`. Problems carry their position like the config's own.
pub fn load_endpoints_str(file_name: &str, text: &str) -> Result<Vec<Endpoint>, LoadError> {
    let Some((root, mut problems)) = tree(file_name, text)? else { return Ok(Vec::new()) };
    let (list, found, _) = yaml::deserialize::<Vec<Endpoint>>(&root);
    problems.extend(noted(file_name, found));
    match (list, problems.is_empty()) {
        (Some(list), true) => Ok(list),
        _ => Err(invalid(text, without_secrets(&root, problems))),
    }
}

/// The tidied tree of `text` and the duplicate keys found in it; `None` for an empty file.
fn tree(file_name: &str, text: &str) -> Result<Option<(Node, Vec<Problem>)>, LoadError> {
    let mut root = match yaml::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => return Ok(None),
        Err(e) => {
            let found = problem(file_name, "(yaml)".into(), (e.line, e.col), e.message, e.expected);
            return Err(invalid(text, vec![found]));
        }
    };
    let mut duplicates = Vec::new();
    yaml::tidy(&mut root, "", &mut duplicates);
    let mut problems: Vec<Problem> = duplicates
        .into_iter()
        .map(|d| {
            let expected = Some(format!("each key once; the first is at line {}", d.first_line));
            problem(file_name, d.path, (d.line, d.col), "duplicate key".into(), expected)
        })
        .collect();
    let mut unset = Vec::new();
    yaml::env::expand(&mut root, "", &|name| std::env::var(name).ok(), &mut unset);
    problems.extend(unset.into_iter().map(|u| {
        let expected = Some(ENV_EXPECTED.to_owned());
        problem(file_name, u.path, (u.line, u.col), u.message, expected)
    }));
    Ok(Some((root, problems)))
}

/// A position in `text` as an editor shows it. The YAML parser places the end of the file (an
/// error only the end reveals, an empty value there) one line past the last, a line an editor
/// does not show when the file ends in a line break: such a position is the end of the last line.
fn within(text: &str, (line, col): (usize, usize)) -> (usize, usize) {
    let lines = editor_lines(text);
    let length = |n: usize| lines[n - 1].chars().count();
    match line.max(1) {
        n if n > lines.len() => (lines.len(), length(lines.len()) + 1),
        n => (n, col.clamp(1, length(n) + 1)),
    }
}

/// The lines of `text` as an editor numbers them: YAML breaks lines at LF, CRLF and a lone
/// CR, and a final line break ends the last line instead of starting another.
fn editor_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.split("\r\n").flat_map(|l| l.split(['\n', '\r'])).collect();
    if lines.len() > 1 && lines.last() == Some(&"") {
        lines.pop();
    }
    lines
}

/// The problems deserialization noted, each at its position.
fn noted(file_name: &str, found: Vec<DeError>) -> impl Iterator<Item = Problem> + '_ {
    found.into_iter().map(move |e| {
        let at = e.at.expect("problems are noted with their position");
        let path = if at.path.is_empty() { "(top level)".to_owned() } else { at.path };
        problem(file_name, path, (at.line, at.col), e.message, e.expected)
    })
}

fn problem(
    file_name: &str,
    path: String,
    (line, col): (usize, usize),
    message: String,
    expected: Option<String>,
) -> Problem {
    Problem { file: file_name.to_owned(), line, col, path, message, expected }
}

/// The issue's path as written and its position; `None` when the rule judged a stand-in: the
/// value itself (or a section around it), or one the rule `reads`, was refused and replaced by
/// its default, and that value's own problem is the one to report.
fn place(root: &Node, issue: &Issue, removed: &[String]) -> Option<(String, usize, usize)> {
    let (path, line, col) = yaml::locate(root, &issue.path, removed);
    let replaced = removed.iter().any(|r| inside(&path, r));
    let read_replaced = issue.reads.iter().any(|read| {
        let read = yaml::locate(root, read, removed).0;
        removed.iter().any(|r| inside(r, &read) || inside(&read, r))
    });
    (!replaced && !read_replaced).then_some((path, line, col))
}

/// Is `inner` the path `outer`, or inside it?
fn inside(inner: &str, outer: &str) -> bool {
    inner.strip_prefix(outer).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// `problems` with every value of the file that holds a password (a URL's userinfo, a
/// `password=` parameter) shown redacted, wherever a problem quotes it: in its message (`"…"
/// is not a list`), its expectation or its path (a key). The types already redact the values
/// they refuse; this covers every other place a message may quote the file.
fn without_secrets(root: &Node, mut problems: Vec<Problem>) -> Vec<Problem> {
    let secrets: Vec<(String, String)> = root
        .scalar_texts()
        .into_iter()
        .map(|text| (text, redact(text)))
        .filter(|(text, shown)| text != shown)
        .flat_map(|(text, shown)| {
            [(format!("{text:?}"), format!("{shown:?}")), (text.into(), shown)]
        })
        .collect();
    if secrets.is_empty() {
        return problems;
    }
    for problem in &mut problems {
        let fields = [&mut problem.path, &mut problem.message];
        for field in fields.into_iter().chain(problem.expected.as_mut()) {
            for (text, shown) in &secrets {
                *field = field.replace(text.as_str(), shown);
            }
        }
    }
    problems
}

/// The problems of `text`, each inside it, in file order, once each.
fn invalid(text: &str, mut problems: Vec<Problem>) -> LoadError {
    for problem in &mut problems {
        (problem.line, problem.col) = within(text, (problem.line, problem.col));
    }
    problems.sort_by(|a, b| (a.line, a.col).cmp(&(b.line, b.col)).then_with(|| a.cmp(b)));
    problems.dedup();
    LoadError::Invalid(Problems(problems))
}
