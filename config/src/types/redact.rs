//! `redact`: a value as it may be printed, with the password of a URL in it as `***`.
//! Used wherever a value is echoed (an error message, `Display`), and on the text of a refused
//! value too: a URL that does not parse still carries its password, often because the password
//! holds a character the URL syntax does not allow. So this reads as little structure as it
//! can: the userinfo runs to the *last* `@`, and a value without `scheme://` counts from its start.

/// Query parameters whose value is a secret: `?password=`, `&pass=`, `pwd`, `token`, `secret`.
const SECRET_PARAMETERS: [&str; 4] = ["pass", "pwd", "token", "secret"];

/// `redis://alice:s3cret@host:6379/2` as `redis://alice:***@host:6379/2`, and
/// `http://h/x?password=s3cret` as `http://h/x?password=***`. A value with nothing to hide is
/// returned as it is.
pub(crate) fn redact(text: &str) -> String {
    let start = text.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = text.split_at(start);
    let (userinfo, host_on) = match rest.rfind('@') {
        Some(at) => rest.split_at(at),
        None => ("", rest),
    };
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => userinfo.to_owned(),
    };
    format!("{scheme}{user}{}", redact_query(host_on))
}

/// The query's secret parameters' values as `***`.
fn redact_query(text: &str) -> String {
    let Some((before, query)) = text.split_once('?') else { return text.to_owned() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{before}?{}", pairs.join("&"))
}

fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMETERS.iter().any(|secret| name.contains(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_become_stars() {
        for (text, shown) in [
            ("redis://alice:s3cr3tPW@host:6379/2", "redis://alice:***@host:6379/2"),
            ("rediss://:s3cr3tPW@host", "rediss://:***@host"),
            ("redis://alice:s3cr3tPW@host:notaport/x", "redis://alice:***@host:notaport/x"),
            // characters a URL cannot hold unescaped: the password still ends at the last @
            ("redis://alice:s3/cr?3t#P@W@host:6379", "redis://alice:***@host:6379"),
            ("http://u:s3cr3tPW@127.0.0.1:2379", "http://u:***@127.0.0.1:2379"),
            ("alice:s3cr3tPW@host:6379", "alice:***@host:6379"),
            ("redis://h:6379/0?password=s3cr3tPW&db=1", "redis://h:6379/0?password=***&db=1"),
            ("http://h/x?a=1&API_TOKEN=s3cr3tPW", "http://h/x?a=1&API_TOKEN=***"),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
    }

    #[test]
    fn values_without_a_password_are_unchanged() {
        for text in [
            "redis://alice@host:6379",
            "redis://host:6379/2",
            "kafka://k:9092",
            "http://127.0.0.1:4318/v1?x=1",
            "3 seconds",
            "",
            "://",
        ] {
            assert_eq!(redact(text), text);
        }
    }
}
