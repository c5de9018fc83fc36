//! The embedded store's dead letters: the envelopes, when each was dead-lettered, and the
//! retention that keeps a poison flood from filling the disk (`dead_letter_retention`: the
//! oldest go first past `max_messages` per queue, and any older than `max_age`).
//!
//! Every function works inside the caller's write transaction, so a dead letter, its indexes
//! and its count change together.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use crate::messaging::envelope::Envelope;

/// (dead-letter queue, id) -> the envelope with its whole error history.
pub(super) const DEAD: TableDefinition<'_, (&str, u128), &[u8]> =
    TableDefinition::new("dead_letters");
/// (dead-letter queue, id) -> when it was dead-lettered (Unix ms).
pub(super) const DEAD_AT: TableDefinition<'_, (&str, u128), u64> =
    TableDefinition::new("dead_letter_at");
/// (dead-lettered at, dead-letter queue, id): every dead letter, oldest first.
pub(super) const DEAD_BY_TIME: TableDefinition<'_, (u64, &str, u128), ()> =
    TableDefinition::new("dead_letter_by_time");
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

pub(super) fn create(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(DEAD)?;
    txn.open_table(DEAD_AT)?;
    txn.open_table(DEAD_BY_TIME)?;
    txn.open_table(DEAD_COUNT)?;
    Ok(())
}

/// Stores `envelope` in `dlq` at `now`, then drops the oldest of `dlq` past the count cap.
pub(super) fn insert(
    txn: &WriteTransaction,
    dlq: &str,
    envelope: &Envelope,
    now: u64,
    retention: Retention,
) -> Result<(), redb::Error> {
    let id = envelope.id.as_u128();
    let replaced =
        txn.open_table(DEAD)?.insert((dlq, id), envelope.to_json().as_slice())?.is_some();
    if replaced {
        // the same message dead-lettered again (replayed, failed again): one entry, new time
        if let Some(at) = txn.open_table(DEAD_AT)?.remove((dlq, id))? {
            txn.open_table(DEAD_BY_TIME)?.remove((at.value(), dlq, id))?;
        }
    }
    txn.open_table(DEAD_AT)?.insert((dlq, id), now)?;
    txn.open_table(DEAD_BY_TIME)?.insert((now, dlq, id), ())?;
    let count = count(txn, dlq)? + u64::from(!replaced);
    txn.open_table(DEAD_COUNT)?.insert(dlq, count)?;
    if count > retention.max_messages {
        // the oldest by id (publish time) go first; bounded by how far over the cap it is
        let over: Vec<u128> = {
            let dead = txn.open_table(DEAD)?;
            let mut ids = Vec::new();
            for entry in dead
                .range((dlq, 0)..=(dlq, u128::MAX))?
                .take((count - retention.max_messages) as usize)
            {
                ids.push(entry?.0.value().1);
            }
            ids
        };
        for old in over {
            tracing::warn!(
                dead_letter_queue = dlq,
                "dead-letter retention: the oldest dead letter dropped (max_messages)"
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
    if let Some(at) = txn.open_table(DEAD_AT)?.remove((dlq, id))? {
        txn.open_table(DEAD_BY_TIME)?.remove((at.value(), dlq, id))?;
    }
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
        remove(txn, &dlq, id)?;
    }
    Ok(())
}

fn count(txn: &WriteTransaction, dlq: &str) -> Result<u64, redb::Error> {
    Ok(txn.open_table(DEAD_COUNT)?.get(dlq)?.map_or(0, |v| v.value()))
}
