//! The embedded store's dead letters: the envelopes, when each was dead-lettered, and the
//! retention that keeps a poison flood from filling the disk (`dead_letter_retention`: past
//! `max_messages` per queue the longest dead-lettered go first, and any older than `max_age`).
//! Both count from when a message was dead-lettered, not published: a replayed message keeps
//! its id, and failing again must not make it the first to go.
//!
//! Every function works inside the caller's write transaction, so a dead letter, its indexes
//! and its count change together.

use redb::{
    ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

/// (dead-letter queue, id) -> the envelope with its whole error history.
pub(super) const DEAD: TableDefinition<'_, (&str, u128), &[u8]> =
    TableDefinition::new("dead_letters");
/// (dead-letter queue, id) -> when it was dead-lettered (Unix ms).
pub(super) const DEAD_AT: TableDefinition<'_, (&str, u128), u64> =
    TableDefinition::new("dead_letter_at");
/// (dead-lettered at, dead-letter queue, id): every dead letter, oldest first.
pub(super) const DEAD_BY_TIME: TableDefinition<'_, (u64, &str, u128), ()> =
    TableDefinition::new("dead_letter_by_time");
/// (dead-letter queue, dead-lettered at, id): each queue's dead letters, oldest first, for the
/// count cap and the oldest-age gauge. Rebuilt from [`DEAD_AT`] at open when not whole (a file
/// written before it existed).
pub(super) const DEAD_BY_QUEUE: TableDefinition<'_, (&str, u64, u128), ()> =
    TableDefinition::new("dead_letter_by_queue");
/// Dead-letter queue -> how many it holds.
pub(super) const DEAD_COUNT: TableDefinition<'_, &str, u64> =
    TableDefinition::new("dead_letter_count");

/// Expired dead letters removed per commit at most, so retention never makes a commit slow.
const SWEEP_PER_COMMIT: usize = 64;

/// `dead_letter_retention`, in the store's units.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_messages: u64,
    pub max_age_ms: u64,
}

/// Whether [`create`] has anything to do: a table missing, or the per-queue index not whole.
pub(super) fn needs_write(txn: &ReadTransaction) -> Result<bool, redb::Error> {
    use super::schema::length;
    let at = length(txn, DEAD_AT)?;
    let whole = at.is_some()
        && length(txn, DEAD)?.is_some()
        && length(txn, DEAD_COUNT)?.is_some()
        && length(txn, DEAD_BY_TIME)? == at
        && length(txn, DEAD_BY_QUEUE)? == at;
    Ok(!whole)
}

pub(super) fn create(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(DEAD)?;
    txn.open_table(DEAD_BY_TIME)?;
    txn.open_table(DEAD_COUNT)?;
    let at = txn.open_table(DEAD_AT)?;
    let mut by_queue = txn.open_table(DEAD_BY_QUEUE)?;
    if by_queue.len()? != at.len()? {
        by_queue.retain(|_, ()| false)?;
        for entry in at.iter()? {
            let (key, at) = entry?;
            let (dlq, id) = key.value();
            by_queue.insert((dlq, at.value(), id), ())?;
        }
        tracing::info!(dead_letters = by_queue.len()?, "dead-letter index rebuilt");
    }
    Ok(())
}

/// Stores `envelope` in `dlq` at `now`, then drops the oldest of `dlq` past the count cap.
pub(super) fn insert(
    txn: &WriteTransaction,
    dlq: &str,
    id: u128,
    json: &[u8],
    now: u64,
    retention: Retention,
) -> Result<(), redb::Error> {
    let replaced = txn.open_table(DEAD)?.insert((dlq, id), json)?.is_some();
    if replaced {
        // the same message dead-lettered again (replayed, failed again): one entry, new time
        unindex(txn, dlq, id)?;
    }
    txn.open_table(DEAD_AT)?.insert((dlq, id), now)?;
    txn.open_table(DEAD_BY_TIME)?.insert((now, dlq, id), ())?;
    txn.open_table(DEAD_BY_QUEUE)?.insert((dlq, now, id), ())?;
    let count = count(txn, dlq)? + u64::from(!replaced);
    txn.open_table(DEAD_COUNT)?.insert(dlq, count)?;
    if count > retention.max_messages {
        // the longest dead-lettered go first; bounded by how far over the cap it is
        let over: Vec<u128> = {
            let by_queue = txn.open_table(DEAD_BY_QUEUE)?;
            let mut ids = Vec::new();
            for entry in by_queue
                .range((dlq, 0, 0)..=(dlq, u64::MAX, u128::MAX))?
                .take((count - retention.max_messages) as usize)
            {
                ids.push(entry?.0.value().2);
            }
            ids
        };
        for old in over {
            let id = crate::messaging::envelope::MessageId::from_u128(old);
            tracing::warn!(
                dead_letter_queue = dlq,
                %id,
                max_messages = retention.max_messages,
                "dead-letter retention: the longest dead-lettered dropped"
            );
            remove(txn, dlq, old)?;
        }
    }
    Ok(())
}

/// Removes one dead letter; its envelope as JSON when there was one.
pub(super) fn remove(
    txn: &WriteTransaction,
    dlq: &str,
    id: u128,
) -> Result<Option<Vec<u8>>, redb::Error> {
    let Some(json) = txn.open_table(DEAD)?.remove((dlq, id))?.map(|v| v.value().to_vec()) else {
        return Ok(None);
    };
    unindex(txn, dlq, id)?;
    let left = count(txn, dlq)?.saturating_sub(1);
    txn.open_table(DEAD_COUNT)?.insert(dlq, left)?;
    Ok(Some(json))
}

/// Removes every dead letter of `dlq`; how many there were.
pub(super) fn purge(txn: &WriteTransaction, dlq: &str) -> Result<u64, redb::Error> {
    let ids: Vec<u128> = {
        let dead = txn.open_table(DEAD)?;
        let mut ids = Vec::new();
        for entry in dead.range((dlq, 0)..=(dlq, u128::MAX))? {
            ids.push(entry?.0.value().1);
        }
        ids
    };
    for id in &ids {
        remove(txn, dlq, *id)?;
    }
    Ok(ids.len() as u64)
}

/// Drops up to [`SWEEP_PER_COMMIT`] dead letters older than `max_age`.
pub(super) fn sweep(
    txn: &WriteTransaction,
    now: u64,
    retention: Retention,
) -> Result<(), redb::Error> {
    let Some(before) = now.checked_sub(retention.max_age_ms) else { return Ok(()) };
    let expired: Vec<(String, u128)> = {
        let by_time = txn.open_table(DEAD_BY_TIME)?;
        let mut expired = Vec::new();
        for entry in by_time.range((0, "", 0)..(before, "", 0))?.take(SWEEP_PER_COMMIT) {
            let entry = entry?;
            let (_, dlq, id) = entry.0.value();
            expired.push((dlq.to_owned(), id));
        }
        expired
    };
    for (dlq, id) in expired {
        let shown = crate::messaging::envelope::MessageId::from_u128(id);
        tracing::warn!(dead_letter_queue = %dlq, id = %shown, "dead-letter retention: older than max_age, dropped");
        remove(txn, &dlq, id)?;
    }
    Ok(())
}

/// Each dead-letter queue holding dead letters: its name, how many, and when its oldest was
/// dead-lettered. One lookup per queue, so a scrape does not read every dead letter.
pub(super) fn depths(
    txn: &ReadTransaction,
) -> Result<Vec<(String, u64, Option<u64>)>, redb::Error> {
    let by_queue = txn.open_table(DEAD_BY_QUEUE)?;
    let mut depths = Vec::new();
    for entry in txn.open_table(DEAD_COUNT)?.iter()? {
        let (dlq, count) = entry?;
        let (dlq, count) = (dlq.value(), count.value());
        if count == 0 {
            continue;
        }
        let oldest = match by_queue.range((dlq, 0, 0)..=(dlq, u64::MAX, u128::MAX))?.next() {
            Some(first) => Some(first?.0.value().1),
            None => None,
        };
        depths.push((dlq.to_owned(), count, oldest));
    }
    Ok(depths)
}

/// Removes a dead letter's time from every index.
fn unindex(txn: &WriteTransaction, dlq: &str, id: u128) -> Result<(), redb::Error> {
    if let Some(at) = txn.open_table(DEAD_AT)?.remove((dlq, id))? {
        let at = at.value();
        txn.open_table(DEAD_BY_TIME)?.remove((at, dlq, id))?;
        txn.open_table(DEAD_BY_QUEUE)?.remove((dlq, at, id))?;
    }
    Ok(())
}

/// Whether any dead letter is older than `max_age`.
pub(super) fn any_expired(
    txn: &ReadTransaction,
    now: u64,
    retention: Retention,
) -> Result<bool, redb::Error> {
    let Some(before) = now.checked_sub(retention.max_age_ms) else { return Ok(false) };
    Ok(txn.open_table(DEAD_BY_TIME)?.range((0, "", 0)..(before, "", 0))?.next().is_some())
}

fn count(txn: &WriteTransaction, dlq: &str) -> Result<u64, redb::Error> {
    Ok(txn.open_table(DEAD_COUNT)?.get(dlq)?.map_or(0, |v| v.value()))
}
