//! A YAML syntax error, placed where the user can fix it. The parser notices an unclosed `[`,
//! `{` or quote only where the file ends, and reports it there, in its own words; the error is
//! moved to where the construct it leaves open began (DESIGN.md, "Configuration"). An error
//! met inside a flow collection that is still open also names where that collection began.

use saphyr_parser::{ScanError, Span};

/// A YAML syntax error, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) line: usize,
    pub(crate) col: usize,
    pub(crate) message: String,
    pub(crate) expected: Option<String>,
}

impl SyntaxError {
    pub(crate) fn new(line: usize, col: usize, message: impl Into<String>) -> Self {
        SyntaxError { line, col, message: message.into(), expected: None }
    }

    /// The parser's error in `text`, given the spans of the collections open when it stopped
    /// (outermost first).
    pub(crate) fn from_parser(text: &str, e: &ScanError, open: &[Span]) -> Self {
        let at = e.marker();
        let plain = SyntaxError::new(at.line(), at.col() + 1, e.info());
        // Only on an error: a config file is small, and indexing by character needs this.
        let chars: Vec<char> = text.chars().collect();
        // The parser already reports these at the opening quote.
        let (noun, quote) = match chars.get(at.index()) {
            Some('\'') => ("single-quoted", '\''),
            _ => ("double-quoted", '"'),
        };
        match e.info() {
            "while scanning a quoted scalar, found unexpected end of stream" => {
                let message = format!("this {noun} string is never closed");
                return SyntaxError {
                    message,
                    expected: Some(format!("a closing {quote}")),
                    ..plain
                };
            }
            // Most often the closing quote is missing and the next key follows.
            "invalid indentation in quoted scalar" => {
                let message = format!("this {noun} string goes on to a line indented too little");
                let expected =
                    Some(format!("a closing {quote} on its line, or that line indented more"));
                return SyntaxError { message, expected, ..plain };
            }
            _ => {}
        }
        let Some((opener, index, line, col)) = innermost_flow(&chars, open) else { return plain };
        let close = if opener == '[' { ']' } else { '}' };
        // Nothing but white space after the error: the parser ran into the end of the file.
        let at_end =
            chars.get(at.index()..).is_none_or(|rest| rest.iter().all(|c| c.is_whitespace()));
        match at_end && index < at.index() {
            true => SyntaxError {
                line,
                col,
                message: format!("this '{opener}' is never closed"),
                expected: Some(format!("',' or '{close}'")),
            },
            false => SyntaxError {
                message: format!(
                    "{}; the '{opener}' at line {line}, column {col} is still open",
                    e.info()
                ),
                ..plain
            },
        }
    }
}

/// The innermost open `[` or `{`: the character, its index, line and column (1-based).
fn innermost_flow(chars: &[char], open: &[Span]) -> Option<(char, usize, usize, usize)> {
    open.iter().rev().find_map(|span| {
        let at = opener(chars, span.start.index(), span.end.index().min(chars.len()))?;
        let (line, col) = position(chars, at);
        Some((chars[at], at, line, col))
    })
}

/// Where the `[` or `{` is in a collection's span, `chars[start..end]`: after its properties
/// (`&anchor`, `!tag`), white space and comments. A block collection's span holds no opener,
/// and an implicit `key: value` pair inside `[...]` opens a mapping with an empty span.
fn opener(chars: &[char], start: usize, end: usize) -> Option<usize> {
    let mut i = start;
    while i < end {
        let word_end =
            |i: usize, stop: fn(char) -> bool| (i..end).find(|j| stop(chars[*j])).unwrap_or(end);
        i = match chars[i] {
            '[' | '{' => return Some(i),
            c if c.is_whitespace() => i + 1,
            '#' => word_end(i, |c| matches!(c, '\n' | '\r')),
            '&' | '!' => word_end(i, char::is_whitespace),
            _ => return None,
        };
    }
    None
}

/// The 1-based line and column of `chars[index]`; YAML breaks lines at LF, CRLF and a lone CR.
fn position(chars: &[char], index: usize) -> (usize, usize) {
    let (mut line, mut col) = (1, 1);
    for (i, c) in chars[..index].iter().enumerate() {
        match c {
            '\r' if chars.get(i + 1) == Some(&'\n') => {}
            '\n' | '\r' => (line, col) = (line + 1, 1),
            _ => col += 1,
        }
    }
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::super::tree::parse;

    fn error(text: &str) -> (usize, usize, String) {
        let e = parse(text).expect_err("a syntax error");
        let expected = e.expected.map(|x| format!(" (expected {x})")).unwrap_or_default();
        (e.line, e.col, format!("{}{expected}", e.message))
    }

    #[test]
    fn an_unclosed_flow_collection_is_reported_at_its_opener() {
        let never = |c: &str, close: char| {
            format!("this '{c}' is never closed (expected ',' or '{close}')")
        };
        assert_eq!(error("service: [unclosed"), (1, 10, never("[", ']')));
        assert_eq!(error("service: [unclosed\n"), (1, 10, never("[", ']')));
        assert_eq!(error("a: {b: 1\n\n# done\n"), (1, 4, never("{", '}')));
        // the innermost one left open; anchors and tags before the opener are skipped
        assert_eq!(error("a: [1, {b: 2}\n"), (1, 4, never("[", ']')));
        assert_eq!(error("a: [1, {b: 2\n"), (1, 8, never("{", '}')));
        assert_eq!(error("a: &x !!seq [1\n"), (1, 13, never("[", ']')));
        assert_eq!(error("a: &x # the list\n  [1\n"), (2, 3, never("[", ']')));
        // an implicit pair inside a sequence has no '{' of its own
        assert_eq!(error("a: [b: 1\n"), (1, 4, never("[", ']')));
        // a plain scalar may run over lines inside [...]: the '[' is still the one to close
        assert_eq!(error("a:\n  - [1, 2\n  - 3\n"), (2, 5, never("[", ']')));
        assert_eq!(error("a: [\n"), (1, 4, never("[", ']')));
    }

    #[test]
    fn an_unterminated_quote_is_reported_at_the_quote() {
        let single = "this single-quoted string is never closed (expected a closing ')";
        let double = "this double-quoted string is never closed (expected a closing \")";
        assert_eq!(error("a: 'x"), (1, 4, single.to_owned()));
        assert_eq!(error("a: 'x\n  b: 1\n"), (1, 4, single.to_owned()));
        assert_eq!(error("a: \"x\n"), (1, 4, double.to_owned()));
        assert_eq!(error("a: [1, \"x\n"), (1, 8, double.to_owned()));
        // a quote left open before the next key: the parser stops at the key, too little indented
        assert_eq!(
            error("service:\n  name: 'checkout\n  register: true\n"),
            (2, 9, "this single-quoted string goes on to a line indented too little (expected a closing ' on its line, or that line indented more)".to_owned())
        );
    }

    #[test]
    fn an_error_inside_an_open_collection_names_where_it_began() {
        assert_eq!(
            error("a: [1\nb: 2\n"),
            (
                2,
                2,
                "illegal placement of ':' indicator; the '[' at line 1, column 4 is still open"
                    .to_owned()
            )
        );
        assert_eq!(
            error("a: {b: [1}\n"),
            (
                1,
                10,
                "while parsing a flow sequence, expected ',' or ']'; the '[' at line 1, column 8 is still open"
                    .to_owned()
            )
        );
    }
}
