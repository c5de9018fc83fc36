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

/// Where queue `queue`'s messages are published.
pub(super) fn subject(queue: &str) -> String {
    format!("outrigger.{queue}")
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
}
