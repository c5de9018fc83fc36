//! The key names of one queue: every one carries the queue's name as its hash tag (`{Q}`), so
//! one queue's keys, its dead letters included, share a cluster slot and every script runs on
//! one node.

/// The queue's stream.
pub(super) fn stream(queue: &str) -> String {
    format!("outrigger:{{{queue}}}")
}

/// Group `group`'s parked messages of `queue`, and the stream they return to when due.
pub(super) fn delayed(queue: &str, group: &str) -> String {
    format!("outrigger:{{{queue}}}:delayed:{group}")
}

/// The groups that consume `queue` with `ordered: true`.
pub(super) fn ordered_groups(queue: &str) -> String {
    format!("outrigger:{{{queue}}}:ordered")
}

/// Group `group`'s order of ordering key `key`: the ids of its unsettled messages, as relayed.
pub(super) fn order_list(queue: &str, group: &str, key: &str) -> String {
    format!("outrigger:{{{queue}}}:order:{group}:{key}")
}

/// Messages of `key` read by group `group` before their turn.
pub(super) fn waiting_list(queue: &str, group: &str, key: &str) -> String {
    format!("outrigger:{{{queue}}}:waiting:{group}:{key}")
}

pub(super) fn retries(queue: &str, group: &str) -> String {
    format!("outrigger:{{{queue}}}:retry:{group}")
}

/// Set for the dedup window when the relay appended message `id` to `queue`.
pub(super) fn relayed(queue: &str, id: impl std::fmt::Display) -> String {
    format!("{}:relayed:{id}", stream(queue))
}

/// Written by the relay before it waits for a cluster primary's replicas (`WAIT` counts from
/// this connection's last write, and a relay repeated after a failure may append nothing).
pub(super) fn relay_mark(queue: &str) -> String {
    format!("{}:relay-mark", stream(queue))
}

/// The dead letters of `queue` in dead-letter queue `dlq`: a stream in the queue's slot, so a
/// message is dead-lettered, and replayed, by one script on one node.
pub(super) fn dead_letters(queue: &str, dlq: &str) -> String {
    format!("{}:dead:{dlq}", stream(queue))
}

/// Their index from message id to stream entry.
pub(super) fn dead_letter_ids(queue: &str, dlq: &str) -> String {
    format!("{}:ids", dead_letters(queue, dlq))
}

/// Where one Redis kept dead-letter queue `dlq` before the layout above (its own hash tag):
/// moved at the first read of each queue that dead-letters into it.
pub(super) fn legacy_dead_letters(dlq: &str) -> (String, String) {
    (stream(dlq), format!("{}:ids", stream(dlq)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of `key` Redis Cluster hashes: what is between the first `{` and the next `}`,
    /// if that is not empty; else the whole key.
    fn hash_tag(key: &str) -> &str {
        let Some(open) = key.find('{') else { return key };
        match key[open + 1..].find('}') {
            Some(0) | None => key,
            Some(len) => &key[open + 1..open + 1 + len],
        }
    }

    #[test]
    fn every_key_of_a_queue_hashes_by_the_queue_name() {
        for queue in ["orders", "billing.v2", "a-b_c"] {
            let keys = [
                stream(queue),
                delayed(queue, "billing"),
                ordered_groups(queue),
                order_list(queue, "billing", "customer-7"),
                waiting_list(queue, "billing", "customer-7"),
                retries(queue, "billing"),
                relayed(queue, "01J0000000000000000000000"),
                relay_mark(queue),
                dead_letters(queue, "orders_deadletter"),
                dead_letter_ids(queue, "orders_deadletter"),
            ];
            for key in &keys {
                assert_eq!(hash_tag(key), queue, "{key}");
                assert!(key.starts_with("outrigger:{"), "{key}");
            }
            let distinct: std::collections::HashSet<_> = keys.iter().collect();
            assert_eq!(distinct.len(), keys.len(), "no two roles share a key: {keys:?}");
        }
    }

    #[test]
    fn a_group_and_an_ordering_key_each_get_keys_of_their_own() {
        assert_ne!(delayed("q", "a"), delayed("q", "b"));
        assert_ne!(retries("q", "a"), retries("q", "b"));
        assert_ne!(order_list("q", "g", "k1"), order_list("q", "g", "k2"));
        assert_ne!(waiting_list("q", "g", "k"), order_list("q", "g", "k"));
        assert_eq!(stream("orders"), "outrigger:{orders}");
        assert_eq!(delayed("orders", "billing"), "outrigger:{orders}:delayed:billing");
        assert_eq!(dead_letters("orders", "dlq"), "outrigger:{orders}:dead:dlq");
        assert_eq!(dead_letter_ids("orders", "dlq"), "outrigger:{orders}:dead:dlq:ids");
        assert_ne!(dead_letters("a", "dlq"), dead_letters("b", "dlq"), "each queue's own");
    }
}
