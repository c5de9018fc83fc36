//! Names on NATS JetStream. Stream and consumer names may not hold `.`, `*`, `>` or whitespace,
//! and queue names hold dots, so a queue's name is escaped into them, one-to-one
//! (docs/design/nats-jetstream.md, "Names"): `_` becomes `__` and `.` becomes `_d`.
//! Subjects keep the queue's own name: `outrigger.<queue>`, its dots as more tokens.

/// `q` escaped for a stream or consumer name: `orders.created` → `orders_dcreated`.
pub(super) fn escape(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 4);
    for c in q.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

/// The stream of queue `queue`.
pub(super) fn queue_stream(queue: &str) -> String {
    format!("OUTRIGGER-Q-{}", escape(queue))
}

/// The stream of dead-letter queue `dlq`.
pub(super) fn dead_letter_stream(dlq: &str) -> String {
    format!("OUTRIGGER-DLQ-{}", escape(dlq))
}

/// The stream of parked messages' state, of queue `queue`.
pub(super) fn state_stream(queue: &str) -> String {
    format!("OUTRIGGER-S-{}", escape(queue))
}

/// Where queue `queue`'s messages without an ordering key are published.
pub(super) fn subject(queue: &str) -> String {
    format!("outrigger.{queue}")
}

/// Where queue `queue`'s messages of ordering key `key` are published: a subject per key, so
/// the server indexes each key's messages (docs/design/nats-jetstream.md §3c).
pub(super) fn key_subject(queue: &str, key: &str) -> String {
    format!("outrigger-k.{}.{}", escape(queue), key_token(key))
}

/// Every keyed subject of queue `queue`: the second subject of its stream.
pub(super) fn key_subjects(queue: &str) -> String {
    format!("outrigger-k.{}.*", escape(queue))
}

/// Where consumer group `group` keeps its place in one key of queue `queue`, `token` being
/// the last token of the key's subject.
pub(super) fn turn_subject(queue: &str, group: &str, token: &str) -> String {
    format!("outrigger-s.{}.o.{}.{token}", escape(queue), escape(group))
}

/// One subject token for ordering key `key`, one-to-one: `k` and the key itself when it holds
/// only letters, digits, `-` and `_` (and is not too long to read), else `x` and its bytes in
/// hex (a key is at most 1 KiB, so a subject stays well under the server's 4 KiB line).
fn key_token(key: &str) -> String {
    let plain = key.len() <= 256
        && !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return format!("k{key}");
    }
    let mut token = String::with_capacity(1 + 2 * key.len());
    token.push('x');
    for byte in key.bytes() {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_one_to_one_and_leaves_no_character_a_stream_name_refuses() {
        let names = ["orders.created", "orders_dcreated", "a_.b", "a._b", "a__b", "a_d", "a.d"];
        let escaped: std::collections::HashSet<String> = names.iter().map(|n| escape(n)).collect();
        assert_eq!(escaped.len(), names.len(), "two names never share an escape: {escaped:?}");
        for name in &escaped {
            assert!(!name.contains(['.', '*', '>', ' ']), "{name}");
        }
        assert_eq!(escape("orders.created"), "orders_dcreated");
        assert_eq!(queue_stream("orders.created"), "OUTRIGGER-Q-orders_dcreated");
        assert_ne!(queue_stream("x"), dead_letter_stream("x"));
        assert_ne!(queue_stream("x"), state_stream("x"));
        assert_eq!(subject("orders.created"), "outrigger.orders.created");
    }

    #[test]
    fn a_key_token_is_one_to_one_and_a_single_subject_token() {
        let keys = ["customer-42", "a.b", "a b", "k", "x6b", "", "ü", "a*", "a>"];
        let tokens: std::collections::HashSet<String> = keys.iter().map(|k| key_token(k)).collect();
        assert_eq!(tokens.len(), keys.len(), "{tokens:?}");
        for token in &tokens {
            assert!(!token.is_empty() && !token.contains(['.', '*', '>', ' ']), "{token}");
        }
        assert_eq!(
            key_subject("orders.created", "customer-42"),
            "outrigger-k.orders_dcreated.kcustomer-42"
        );
        assert_eq!(key_token("a.b"), "x612e62");
        assert!(key_token(&"é".repeat(512)).len() <= 2049, "a 1 KiB key stays one bounded token");
    }
}
