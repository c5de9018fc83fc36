//! Names that other systems match against: upstream names (request authorities) and queue
//! names (broker keys, URL path segments). Each refuses what could never match, with the rule.

use super::{ValueError, string_conversions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An upstream's name, the key under `upstreams:`. Requests choose an upstream by their
/// authority's host, which is a lowercase DNS name, so the name must be one too.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpstreamName(String);

/// A queue name: 1 to 200 of `A-Z a-z 0-9 . _ -`, safe as a Redis key and in a URL path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

// === impl UpstreamName ===

impl UpstreamName {
    /// Stands in for the name while an upstream's fields are read; the `upstreams:` map puts
    /// the key in before the value leaves it (see `model::upstream`). Never observable there.
    pub(crate) fn unset() -> Self {
        UpstreamName(String::new())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UpstreamName {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        match text.len() <= 253 && text.split('.').all(label_ok) {
            true => Ok(UpstreamName(text.to_owned())),
            false => Err(ValueError::new(
                format!("{text:?} is not a valid upstream name"),
                "a lowercase DNS name such as payments or payments.prod: a-z, 0-9 and -, dots between parts",
            )),
        }
    }
}

impl fmt::Display for UpstreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for UpstreamName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

// === impl QueueName ===

impl QueueName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `outrigger.<queue>` is a NATS subject: no empty token, so no leading or
    /// trailing dot and no two dots in a row.
    pub fn is_nats_subject(&self) -> bool {
        self.0.split('.').all(|token| !token.is_empty())
    }

    /// `<queue>_deadletter`, the default dead-letter queue. Built, not parsed: it may run past
    /// the 200 characters a written name is allowed.
    pub fn dead_letter(&self) -> QueueName {
        QueueName(format!("{}_deadletter", self.0))
    }
}

impl FromStr for QueueName {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let ok = (1..=200).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        match ok {
            true => Ok(QueueName(text.to_owned())),
            false => Err(ValueError::new(
                format!("{text:?} is not a valid queue name"),
                "1 to 200 of A-Z, a-z, 0-9, '.', '_' and '-', e.g. registration.welcome_email",
            )),
        }
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_conversions!(UpstreamName, QueueName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_are_lowercase_dns_names() {
        for ok in ["payments", "payments.prod", "a", "api-v2.example.com", "9lives"] {
            assert!(ok.parse::<UpstreamName>().is_ok(), "{ok}");
        }
        for bad in ["", "Payments", "pay_ments", "-x", "x-", "a..b", "a.", "has space"] {
            assert!(bad.parse::<UpstreamName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_names_and_their_dead_letter_queue() {
        let q: QueueName = "registration.welcome_email".parse().unwrap();
        assert_eq!(q.dead_letter().as_str(), "registration.welcome_email_deadletter");
        for bad in ["", "a b", "a/b", &"x".repeat(201)] {
            assert!(bad.parse::<QueueName>().is_err(), "{bad}");
        }
    }
}
