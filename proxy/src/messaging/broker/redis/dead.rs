//! Dead letters on Redis. A dead-letter queue `D` is kept per queue that dead-letters into it:
//! `outrigger:{Q}:dead:D` (a stream) and `outrigger:{Q}:dead:D:ids` (message id → entry), in
//! queue `Q`'s hash slot, so a dead letter and the acknowledgement of its original are one
//! MULTI, and a replay one script, on one node of a cluster. The API names `D`: it is read
//! across its queues (the lanes this service's subscriptions dead-letter into it, else `Q` of
//! the default name `Q_deadletter`), newest first.
//!
//! One Redis used to keep `D` under its own tag (`outrigger:{D}`); a queue's dead letters are
//! moved from there at the queue's first read by an upgraded sidecar.

use std::collections::HashMap;
use std::time::SystemTime;

use redis::AsyncCommands;

use super::conn::Source;
use super::keys::{dead_letter_ids, dead_letters, legacy_dead_letters, stream};
use super::scripts::{DEAD_LETTER, DELETE_DEAD_LETTER, MIGRATE_DEAD_LETTERS, REPLAY};
use super::{Redis, field, store_error};
use crate::messaging::broker::{BrokerError, DeadLetterPage, Lane};
use crate::messaging::envelope::{Envelope, MessageId, unix_millis};

/// Legacy entries looked at per migration script call: a bounded pause of Redis.
const MIGRATE_PER_CALL: usize = 200;

/// Each dead-letter queue's queues, from the subscribed lanes.
pub(super) fn sources(lanes: &[Lane]) -> HashMap<String, Vec<String>> {
    let mut sources: HashMap<String, Vec<String>> = HashMap::new();
    for lane in lanes {
        let queues = sources.entry(lane.dead_letter_queue.clone()).or_default();
        if !queues.contains(&lane.queue) {
            queues.push(lane.queue.clone());
        }
    }
    sources
}

/// A stream entry id, `MS-SEQ`, as numbers: entries of two streams compare by time.
fn entry_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl Redis {
    /// The queues whose dead letters go to `dlq`.
    fn sources_of(&self, dlq: &str) -> Vec<String> {
        if let Some(queues) = self.inner.dead_letter_sources.get(dlq) {
            return queues.clone();
        }
        dlq.strip_suffix("_deadletter").map(|queue| vec![queue.to_owned()]).unwrap_or_default()
    }

    /// On one Redis, moves `queue`'s dead letters out of the layout before they shared its slot
    /// (into every dead-letter queue it feeds), a bounded batch per script call.
    pub(super) async fn migrate_dead_letters(&self, queue: &str) -> Result<(), BrokerError> {
        let dlqs: Vec<String> = self
            .inner
            .dead_letter_sources
            .iter()
            .filter(|(_, queues)| queues.iter().any(|q| q == queue))
            .map(|(dlq, _)| dlq.clone())
            .collect();
        for dlq in dlqs {
            self.migrate(queue, &dlq).await?;
        }
        Ok(())
    }

    /// The same for every queue of `dlq`: the dead-letter API sees what an older sidecar
    /// still writes there during a rolling upgrade.
    async fn migrate_dead_letters_of(&self, dlq: &str) -> Result<(), BrokerError> {
        for queue in self.sources_of(dlq) {
            self.migrate(&queue, dlq).await?;
        }
        Ok(())
    }

    async fn migrate(&self, queue: &str, dlq: &str) -> Result<(), BrokerError> {
        if !matches!(self.inner.source, Source::Single(_)) {
            return Ok(()); // a cluster never had the old layout
        }
        let (legacy, legacy_ids) = legacy_dead_letters(dlq);
        let mut conn = self.conn().await?;
        // up to the last entry now (the stream may be a live queue too), from where the last
        // pass for this queue stopped: entries appended since sort after it
        let last: redis::streams::StreamRangeReply =
            conn.xrevrange_count(&legacy, "+", "-", 1).await.map_err(store_error)?;
        let Some(end) = last.ids.first().map(|e| e.id.clone()) else { return Ok(()) };
        let key = (queue.to_owned(), dlq.to_owned());
        let scanned =
            self.inner.migrated.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let mut cursor = scanned.unwrap_or_else(|| "-".to_owned());
        if cursor != "-" && entry_order(&cursor) >= entry_order(&end) {
            return Ok(());
        }
        let mut moved = 0u64;
        loop {
            let (batch, next): (u64, String) = redis::cmd("EVAL")
                .arg(MIGRATE_DEAD_LETTERS)
                .arg(4)
                .arg(&legacy)
                .arg(&legacy_ids)
                .arg(dead_letters(queue, dlq))
                .arg(dead_letter_ids(queue, dlq))
                .arg(queue)
                .arg(&cursor)
                .arg(&end)
                .arg(MIGRATE_PER_CALL)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            moved += batch;
            if next.is_empty() {
                break;
            }
            cursor = next;
        }
        self.inner.migrated.lock().unwrap_or_else(|e| e.into_inner()).insert(key, end);
        if moved > 0 {
            tracing::info!(
                queue,
                dead_letter_queue = dlq,
                moved,
                "dead letters moved to the queue's own keys"
            );
        }
        Ok(())
    }

    /// Adds to `pipe` the dead letter, with the retention applied.
    pub(super) fn add_dead_letter(
        &self,
        pipe: &mut redis::Pipeline,
        envelope: &Envelope,
        dlq: &str,
    ) {
        let retention = self.inner.retention;
        pipe.cmd("EVAL")
            .arg(DEAD_LETTER)
            .arg(2)
            .arg(dead_letters(&envelope.queue, dlq))
            .arg(dead_letter_ids(&envelope.queue, dlq))
            .arg(envelope.to_json())
            .arg(envelope.id.to_string())
            .arg(retention.max_messages)
            .arg(unix_millis(SystemTime::now()).saturating_sub(retention.max_age_ms))
            .ignore();
    }

    /// The queue of `dlq` that holds dead letter `id`, and its entry there.
    async fn find_dead_letter(
        &self,
        dlq: &str,
        id: MessageId,
    ) -> Result<Option<(String, String)>, BrokerError> {
        let mut conn = self.conn().await?;
        for queue in self.sources_of(dlq) {
            let entry: Option<String> = conn
                .hget(dead_letter_ids(&queue, dlq), id.to_string())
                .await
                .map_err(store_error)?;
            if let Some(entry) = entry {
                return Ok(Some((queue, entry)));
            }
        }
        Ok(None)
    }

    /// A page of `dlq`'s dead letters across its queues, newest first: by entry, then by
    /// message id (two queues' entries can share a millisecond and a sequence number).
    pub(super) async fn list_dead_letters(
        &self,
        dlq: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        self.migrate_dead_letters_of(dlq).await?;
        let bound = match before {
            None => None,
            Some(id) => match self.find_dead_letter(dlq, id).await? {
                Some((_, entry)) => Some((entry_order(&entry), id)),
                None => return Ok(DeadLetterPage { messages: Vec::new(), next: None }),
            },
        };
        // inclusive: an entry of another queue in the same millisecond may sort below `before`
        let end = bound.map_or("+".to_owned(), |((ms, seq), _)| format!("{ms}-{seq}"));
        let mut conn = self.conn().await?;
        let mut found = Vec::new();
        for queue in self.sources_of(dlq) {
            let page: redis::streams::StreamRangeReply = conn
                .xrevrange_count(dead_letters(&queue, dlq), &end, "-", limit + 2)
                .await
                .map_err(store_error)?;
            found.extend(page.ids.iter().filter_map(|entry| {
                let envelope = Envelope::from_json(field(entry, "envelope")?.as_bytes()).ok()?;
                Some((entry_order(&entry.id), envelope))
            }));
        }
        found.retain(|(order, envelope)| bound.is_none_or(|bound| (*order, envelope.id) < bound));
        found.sort_by_key(|(order, envelope)| std::cmp::Reverse((*order, envelope.id)));
        let mut messages: Vec<Envelope> = found.into_iter().map(|(_, e)| e).collect();
        let next = (messages.len() > limit).then(|| {
            messages.truncate(limit);
            messages.last().map(|e| e.id)
        });
        Ok(DeadLetterPage { messages, next: next.flatten() })
    }

    pub(super) async fn get_dead_letter(
        &self,
        dlq: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, BrokerError> {
        self.migrate_dead_letters_of(dlq).await?;
        self.read_dead_letter(dlq, id).await
    }

    /// Dead letter `id` of `dlq`, as the keys hold it now.
    async fn read_dead_letter(
        &self,
        dlq: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, BrokerError> {
        let Some((queue, entry)) = self.find_dead_letter(dlq, id).await? else { return Ok(None) };
        let mut conn = self.conn().await?;
        let found: redis::streams::StreamRangeReply =
            conn.xrange(dead_letters(&queue, dlq), &entry, &entry).await.map_err(store_error)?;
        Ok(found
            .ids
            .first()
            .and_then(|e| field(e, "envelope"))
            .and_then(|json| Envelope::from_json(json.as_bytes()).ok()))
    }

    pub(super) async fn delete_dead_letter(
        &self,
        dlq: &str,
        id: MessageId,
    ) -> Result<bool, BrokerError> {
        self.migrate_dead_letters_of(dlq).await?;
        let Some((queue, _)) = self.find_dead_letter(dlq, id).await? else { return Ok(false) };
        let mut conn = self.conn().await?;
        let removed: i64 = redis::cmd("EVAL")
            .arg(DELETE_DEAD_LETTER)
            .arg(2)
            .arg(dead_letters(&queue, dlq))
            .arg(dead_letter_ids(&queue, dlq))
            .arg(id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(removed == 1)
    }

    pub(super) async fn purge_dead_letters(&self, dlq: &str) -> Result<u64, BrokerError> {
        self.migrate_dead_letters_of(dlq).await?;
        let mut conn = self.conn().await?;
        let mut purged = 0;
        for queue in self.sources_of(dlq) {
            let (count,): (u64,) = redis::pipe()
                .atomic()
                .cmd("XLEN")
                .arg(dead_letters(&queue, dlq))
                .cmd("DEL")
                .arg(dead_letters(&queue, dlq))
                .arg(dead_letter_ids(&queue, dlq))
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            purged += count;
        }
        Ok(purged)
    }

    pub(super) async fn replay_dead_letters(
        &self,
        dlq: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, BrokerError> {
        self.migrate_dead_letters_of(dlq).await?;
        let mut replayed = Vec::new();
        for id in ids {
            let Some((queue, _)) = self.find_dead_letter(dlq, id).await? else { continue };
            let Some(mut envelope) = self.read_dead_letter(dlq, id).await? else { continue };
            crate::messaging::broker::mark_replayed(&mut envelope, dlq, SystemTime::now());
            let mut conn = self.conn().await?;
            // the dead letter and its queue's stream: one slot, one script
            let moved: i64 = redis::cmd("EVAL")
                .arg(REPLAY)
                .arg(3)
                .arg(dead_letters(&queue, dlq))
                .arg(dead_letter_ids(&queue, dlq))
                .arg(stream(&queue))
                .arg(id.to_string())
                .arg(envelope.to_json())
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            if moved == 1 {
                replayed.push(id);
            }
        }
        Ok(replayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(queue: &str, dlq: &str) -> Lane {
        Lane { queue: queue.into(), dead_letter_queue: dlq.into() }
    }

    #[test]
    fn a_dead_letter_queue_is_read_across_the_lanes_that_feed_it() {
        let sources = sources(&[
            lane("orders.high", "orders.dlq"),
            lane("orders", "orders.dlq"),
            lane("mail", "mail_deadletter"),
        ]);
        assert_eq!(sources["orders.dlq"], ["orders.high", "orders"]);
        assert_eq!(sources["mail_deadletter"], ["mail"]);
    }

    #[test]
    fn entries_of_two_streams_compare_by_time_then_sequence() {
        assert!(entry_order("1700000000001-0") > entry_order("1700000000000-5"));
        assert!(entry_order("1700000000000-10") > entry_order("1700000000000-9"));
    }
}
