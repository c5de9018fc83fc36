//! The store's file: its tables, and opening it (repaired after a crash, the due index rebuilt
//! when it is not whole).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::dead;

/// (queue, id) -> the envelope as JSON: every message not yet acknowledged, in id order.
pub(super) const MESSAGES: TableDefinition<'_, (&str, u128), &[u8]> =
    TableDefinition::new("messages");
/// (queue, id) -> (attempts so far, due at: the publish time, or parked until).
pub(super) const STATE: TableDefinition<'_, (&str, u128), (u32, u64)> =
    TableDefinition::new("state");
/// (queue, due at, id) for every stored message: a read takes what is due, soonest first,
/// without touching what waits (a backlog of parked messages costs a read nothing).
pub(super) const DUE: TableDefinition<'_, (&str, u64, u128), ()> = TableDefinition::new("due");
/// (queue, Idempotency-Key) -> (id, expires at).
pub(super) const DEDUP: TableDefinition<'_, (&str, &str), (u128, u64)> =
    TableDefinition::new("dedup");
/// (expires at, queue, Idempotency-Key): lets each commit sweep a few expired keys, oldest first.
pub(super) const DEDUP_EXPIRY: TableDefinition<'_, (u64, &str, &str), ()> =
    TableDefinition::new("dedup_expiry");
/// (queue, id) -> expires at: ids delivered whose acknowledgement failed, remembered for the
/// dedup window so that a restart does not deliver them again.
pub(super) const ACKED: TableDefinition<'_, (&str, u128), u64> = TableDefinition::new("acked");
/// (expires at, queue, id): lets each commit forget a few expired acknowledged ids.
pub(super) const ACKED_EXPIRY: TableDefinition<'_, (u64, &str, u128), ()> =
    TableDefinition::new("acked_expiry");

/// Name -> value: `applied_lsn`, the number of the last log record applied.
pub(super) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// Memory redb keeps for pages it read and pages written but not yet flushed.
const CACHE_BYTES: usize = 32 << 20;

/// Opens (or creates) the file, repairing it after a crash, with every table.
pub(super) fn open_file(path: &Path) -> Result<Database, redb::Error> {
    let mut builder = Database::builder();
    // redb's default is 1 GiB: a sidecar's budget is a few MiB, and what does not fit is read
    // from the OS's page cache
    builder.set_cache_size(CACHE_BYTES);
    builder.set_repair_callback(|session| {
        if session.progress() == 0.0 {
            tracing::warn!(
                "repairing the message store after an unclean shutdown (kill -9, a crash, a write error)"
            );
        }
    });
    let db = builder.create(path)?;
    create_tables(&db)?;
    Ok(db)
}

/// Creates any missing table; rebuilds the due index from the messages' state if it is not
/// whole (a file written before the index existed). Writes nothing to a file already complete.
fn create_tables(db: &Database) -> Result<(), redb::Error> {
    if !needs_write(db)? {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        txn.open_table(META)?;
        txn.open_table(DEDUP)?;
        txn.open_table(DEDUP_EXPIRY)?;
        txn.open_table(ACKED)?;
        txn.open_table(ACKED_EXPIRY)?;
        dead::create(&txn)?;
        let state = txn.open_table(STATE)?;
        let mut due = txn.open_table(DUE)?;
        let stored = txn.open_table(MESSAGES)?.len()?;
        if due.len()? != stored {
            tracing::warn!(stored, "rebuilding the message store's due index");
            due.retain(|_, _| false)?;
            for entry in txn.open_table(MESSAGES)?.iter()? {
                let entry = entry?;
                let (queue, id) = entry.0.value();
                let at = state.get((queue, id))?.map_or(0, |s| s.value().1);
                due.insert((queue, at, id), ())?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Whether a table is missing or an index is not whole: a file that has all of them opens
/// without a write, so it opens on a full disk too.
fn needs_write(db: &Database) -> Result<bool, redb::Error> {
    let txn = db.begin_read()?;
    let stored = length(&txn, MESSAGES)?;
    let whole = stored.is_some()
        && length(&txn, DUE)? == stored
        && length(&txn, STATE)?.is_some()
        && length(&txn, META)?.is_some()
        && length(&txn, DEDUP)?.is_some()
        && length(&txn, DEDUP_EXPIRY)?.is_some()
        && length(&txn, ACKED)?.is_some()
        && length(&txn, ACKED_EXPIRY)?.is_some();
    Ok(!whole || dead::needs_write(&txn)?)
}

/// How many entries `table` holds; `None` when it does not exist.
pub(super) fn length<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<'_, K, V>,
) -> Result<Option<u64>, redb::Error> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table.len()?)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// The number of messages stored.
pub(super) fn stored(db: &Database) -> Result<u64, redb::Error> {
    Ok(db.begin_read()?.open_table(MESSAGES)?.len()?)
}
