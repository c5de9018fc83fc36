//! The app's own outbox (`messaging.app_outbox`, DESIGN.md "The app's outbox"): the app inserts a
//! row into its PostgreSQL table in the same transaction as its business data, and this task
//! moves each committed row into Outrigger's outbox, then deletes it. A rolled-back row is never
//! seen. A row is stored under an Idempotency-Key (the row's `idempotency-key` header, else its
//! `id`), so a relay repeated by the same sidecar after a crash between the store's commit and
//! the row's delete finds the key and stores nothing new.
//!
//! One round is one transaction: the oldest rows (`created_at`, then `id`) taken with
//! `FOR UPDATE SKIP LOCKED`, so replicas share the table; stored in one commit of the outbox;
//! deleted; committed. A row with an ordering key waits while an older row of its key is still
//! in the table and not in this round (another replica holds it, or it cannot be published):
//! one key's rows enter the outboxes in order. Woken by `NOTIFY outrigger_outbox` (the trigger
//! in [`ddl`]), and polled every `poll` besides. A row that cannot be published (a bad queue
//! name, a payload over 1 MiB, a bad header) stays in the table, is passed over, holds back the
//! later rows of its ordering key, and is named in `/readyz`; once deleted it holds nothing
//! back, and a row fixed in place is looked at again within [`RECHECK_REFUSED`].
//!
//! A database outage pauses the relay: the rows wait in the app's table, `/readyz` shows the
//! `app_outbox` check as `degraded`, and the relay reconnects with backoff. Every round has a
//! deadline ([`ROUND_TIMEOUT`]): a connection that hangs is dropped (its locks with it) and made
//! again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outrigger_config::{self as config, QueueName, TableName};
use serde_json::value::RawValue;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::error::chain;
use crate::messaging::Messaging;
use crate::messaging::broker::{BrokerError, Outbox, Publish, Published};
use crate::messaging::publish::{KEY_RULE, MAX_PAYLOAD_BYTES, valid_key};
use crate::policy::backoff::Backoff;
use crate::telemetry::trace::Kind;

/// Rows moved per transaction at most.
const BATCH: i64 = 500;
/// The channel the table's trigger notifies.
pub const CHANNEL: &str = "outrigger_outbox";
/// How soon a round that passed over rows held by another replica is tried again.
const HELD_BACK_AGAIN: Duration = Duration::from_millis(50);
/// Rows that cannot be published, remembered (and passed over) at most.
const MAX_REFUSED: usize = 1000;
/// How often rows that could not be published are looked at again.
const RECHECK_REFUSED: Duration = Duration::from_secs(10);
/// Connecting, and one round (take, store, delete, commit), each at most.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle connection is probed after this, so a dead path is found while nothing is relayed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// The SQL that makes `table`, its indexes, and the trigger that wakes the relay at each commit
/// that inserted rows. Printed in docs/messaging.md (a test keeps the two the same).
pub fn ddl(table: &TableName) -> String {
    let (quoted, name) = (table.quoted(), table.as_str().replace('.', "_"));
    format!(
        "CREATE TABLE {quoted} (
  id         text PRIMARY KEY,
  queue      text NOT NULL,
  payload    jsonb NOT NULL,
  headers    jsonb,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {name}_created ON {quoted} (created_at, id);
CREATE INDEX {name}_ordering ON {quoted} ((headers->>'outrigger-ordering-key'), created_at, id)
  WHERE headers ? 'outrigger-ordering-key';
CREATE FUNCTION {name}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $$;
CREATE TRIGGER {name}_notify AFTER INSERT ON {quoted}
  FOR EACH STATEMENT EXECUTE FUNCTION {name}_notify();
"
    )
}

/// What the relay last saw of the app's database, for readiness.
#[derive(Debug, Default)]
pub struct Status {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Connected and relaying (after the first connection).
    connected: bool,
    /// The last error, while it lasts.
    failing: Option<String>,
    /// Rows passed over, and why the first of them was refused.
    refused: Option<(usize, String)>,
}

impl Status {
    /// `Ok(detail)` while the table is relayed; `Err(detail)` while the database cannot be
    /// reached or rows cannot be published.
    pub fn check(&self, table: &TableName) -> Result<String, String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(error) = &state.failing {
            return Err(format!("{error}; the app's rows wait in table {table}"));
        }
        if let Some((rows, first)) = &state.refused {
            return Err(format!(
                "{rows} row(s) of table {table} cannot be published and stay there: {first}; fix or delete them"
            ));
        }
        match state.connected {
            true => Ok(format!("postgres: relaying table {table}")),
            false => Err(format!("postgres: connecting; the app's rows wait in table {table}")),
        }
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Why the relay paused; the rows stay in the app's table.
#[derive(Debug, thiserror::Error)]
pub enum AppOutboxError {
    #[error("reading the PostgreSQL URL from {path} failed")]
    UrlFile {
        path: std::path::PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("the PostgreSQL URL in {path} is not valid: {reason}")]
    BadUrlFile { path: std::path::PathBuf, reason: String },
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres closed the connection")]
    Closed,
    #[error("postgres did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("table {table} {problem} (its DDL is in docs/messaging.md, \"The app's outbox\")")]
    Table { table: TableName, problem: String },
    #[error("the outbox did not take the rows")]
    Outbox(#[source] BrokerError),
    #[error("the message store cannot be opened")]
    Store(#[source] crate::messaging::broker::embedded::OpenError),
}

/// Relays `cfg`'s table into `messaging`'s outbox until `stop` turns true.
pub async fn run(
    messaging: Arc<Messaging>,
    cfg: config::AppOutbox,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let backoff = Backoff::new(config::Backoff {
        initial: config::Duration::from_millis(250),
        max: config::Duration::from_secs(10),
        ..config::Backoff::HTTP
    });
    let mut relay = Relay {
        messaging,
        cfg,
        status,
        refused: HashMap::new(),
        rechecked: Instant::now(),
        served: false,
    };
    let (mut failures, mut previous) = (0u32, Duration::ZERO);
    loop {
        let error = tokio::select! {
            result = relay.connected() => match result {
                Ok(()) => return,
                Err(error) => error,
            },
            _ = stop.wait_for(|stop| *stop) => return,
        };
        if std::mem::take(&mut relay.served) {
            // a round ran to its end since the last failure: this one starts the backoff again
            failures = 0;
        }
        if failures == 0 {
            tracing::warn!(error = %chain(&error), "relaying the app's outbox table paused; its rows wait there");
        }
        relay.status.update(|s| s.failing = Some(chain(&error)));
        previous = backoff.delay(failures, previous);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(previous) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

struct Relay {
    messaging: Arc<Messaging>,
    cfg: config::AppOutbox,
    status: Arc<Status>,
    /// Rows that cannot be published, by id, with why: passed over until [`RECHECK_REFUSED`].
    refused: HashMap<String, Refused>,
    rechecked: Instant,
    /// A round ran to its end (relaying, or finding nothing) since the last failure.
    served: bool,
}

/// A row that cannot be published: why, and its ordering key (whose later rows wait for it).
struct Refused {
    reason: String,
    key: Option<String>,
}

impl Relay {
    /// Connects, checks the table, listens, and relays until the connection fails (never
    /// returns `Ok`; the caller's `stop` ends it).
    async fn connected(&mut self) -> Result<(), AppOutboxError> {
        let mut pg: tokio_postgres::Config = self.url()?.parse()?;
        pg.connect_timeout(ROUND_TIMEOUT).keepalives_idle(KEEPALIVE_IDLE);
        // the server ends what the client gave up on: a statement past the round's deadline,
        // and a transaction left open (its row locks with it) by a connection that went away
        let limits = format!(
            "-c statement_timeout={}ms -c idle_in_transaction_session_timeout={}ms",
            ROUND_TIMEOUT.as_millis(),
            ROUND_TIMEOUT.as_millis() + 5_000
        );
        let options = match pg.get_options() {
            Some(theirs) => format!("{theirs} {limits}"),
            None => limits,
        };
        pg.options(&options);
        let (mut client, mut connection) = deadline(pg.connect(NoTls)).await??;
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        // the connection's messages: NOTIFYs wake the relay; its end ends the relay's round
        let mut driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => woken.notify_one(),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Some(error),
                    None => return None,
                }
            }
        });
        let result = tokio::select! {
            result = self.serve(&mut client, &wake) => result,
            ended = &mut driver => Err(match ended {
                Ok(Some(error)) => error.into(),
                _ => AppOutboxError::Closed,
            }),
        };
        driver.abort();
        self.status.update(|s| s.connected = false);
        result
    }

    /// The URL, from the config or read from `postgres_file` now.
    fn url(&self) -> Result<String, AppOutboxError> {
        url_of(&self.cfg)
    }
}

/// `outrigger check`: connects as the relay does and checks the table; the error says what is
/// missing (the DDL is [`ddl`]).
pub async fn check(cfg: &config::AppOutbox) -> Result<(), AppOutboxError> {
    let mut pg: tokio_postgres::Config = url_of(cfg)?.parse()?;
    pg.connect_timeout(ROUND_TIMEOUT);
    let (client, connection) = deadline(pg.connect(NoTls)).await??;
    let driver = tokio::spawn(connection);
    let checked = deadline(check_table(&client, &cfg.table)).await;
    driver.abort();
    checked?
}

/// `cfg`'s URL, from the config or read from `postgres_file` now.
fn url_of(cfg: &config::AppOutbox) -> Result<String, AppOutboxError> {
    if let Some(url) = &cfg.postgres {
        return Ok(url.as_str().to_owned());
    }
    let path = cfg.postgres_file.clone().unwrap_or_default();
    let text = std::fs::read_to_string(&path)
        .map_err(|cause| AppOutboxError::UrlFile { path: path.clone(), cause })?;
    let url: config::PostgresUrl = text.trim().parse().map_err(|e: config::ValueError| {
        AppOutboxError::BadUrlFile { path, reason: e.to_string() }
    })?;
    Ok(url.as_str().to_owned())
}

impl Relay {
    async fn serve(&mut self, client: &mut Client, wake: &Notify) -> Result<(), AppOutboxError> {
        deadline(check_table(client, &self.cfg.table)).await??;
        deadline(client.batch_execute(&format!("LISTEN {CHANNEL}"))).await??;
        self.status.update(|s| {
            s.connected = true;
            s.failing = None;
        });
        let statements = deadline(Statements::prepare(client, &self.cfg.table)).await??;
        loop {
            if self.rechecked.elapsed() >= RECHECK_REFUSED && !self.refused.is_empty() {
                // a row fixed meanwhile goes now; one still bad is refused again
                self.refused.clear();
            }
            if self.rechecked.elapsed() >= RECHECK_REFUSED {
                self.rechecked = Instant::now();
            }
            let round = deadline(self.round(client, &statements)).await??;
            self.served = true;
            let wait = if round.relayed > 0 && round.taken == BATCH as usize {
                continue;
            } else if round.held_by_others {
                HELD_BACK_AGAIN.min(self.cfg.poll.get())
            } else {
                self.cfg.poll.get()
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One transaction: take the oldest rows, store them in the outbox, delete them.
    async fn round(
        &mut self,
        client: &mut Client,
        statements: &Statements,
    ) -> Result<Round, AppOutboxError> {
        let txn = client.transaction().await?;
        if !self.refused.is_empty() {
            // a refused row deleted meanwhile no longer holds its key back
            let ids: Vec<&str> = self.refused.keys().map(String::as_str).collect();
            let present: HashSet<String> =
                txn.query(&statements.present, &[&ids]).await?.iter().map(|r| r.get(0)).collect();
            self.refused.retain(|id, _| present.contains(id));
        }
        let refused: Vec<&str> = self.refused.keys().map(String::as_str).collect();
        let refused_keys: Vec<&str> =
            self.refused.values().filter_map(|r| r.key.as_deref()).collect();
        let rows = txn.query(&statements.take, &[&BATCH, &refused, &refused_keys]).await?;
        let mut round = Round { taken: rows.len(), ..Round::default() };
        let keyed: Vec<&str> = rows
            .iter()
            .filter(|row| row.get::<_, Option<&str>>(4).is_some())
            .map(|row| row.get::<_, &str>(0))
            .collect();
        let held: HashSet<String> = match keyed.is_empty() {
            true => HashSet::new(),
            false => txn
                .query(&statements.held_back, &[&keyed])
                .await?
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect(),
        };
        // keys whose older rows cannot be published: their later rows wait for them
        let mut blocked: HashSet<String> =
            self.refused.values().filter_map(|r| r.key.clone()).collect();
        let (mut ids, mut batch) = (Vec::new(), Vec::new());
        let tracer = self.messaging.tracer();
        for row in &rows {
            let (id, key): (&str, Option<&str>) = (row.get(0), row.get(4));
            if key.is_some_and(|key| blocked.contains(key)) {
                continue;
            }
            if held.contains(id) {
                // an older row of its key is held by another replica's round (or is refused)
                round.held_by_others |= key.is_some_and(|key| !blocked.contains(key));
                blocked.extend(key.map(str::to_owned));
                continue;
            }
            let fields =
                RowFields { id, queue: row.get(1), payload: row.get(2), headers: row.get(3) };
            let publish = fields.publish().and_then(|publish| {
                let queue = publish.queue.parse().expect("checked by RowFields::publish");
                match self.messaging.refuses(&queue) {
                    Some(reason) => Err(format!("queue: {reason}")),
                    None => Ok(publish),
                }
            });
            let mut publish = match publish {
                Ok(publish) => publish,
                Err(reason) => {
                    tracing::warn!(row = %id, %reason, table = %self.cfg.table, "a row of the app's outbox cannot be published; it stays in the table");
                    blocked.extend(key.map(str::to_owned));
                    if self.refused.len() < MAX_REFUSED {
                        let key = key.map(str::to_owned);
                        self.refused.insert(id.to_owned(), Refused { reason, key });
                    }
                    continue;
                }
            };
            // the message carries a publish span, child of the app's trace if the row names
            // one, as an HTTP publish does
            let parent =
                publish.traceparent.as_deref().and_then(|t| http::HeaderValue::from_str(t).ok());
            let mut span = tracer.start(parent.as_ref(), "send", Kind::Producer);
            crate::messaging::publish::send_attributes(&mut span, &publish.queue);
            span.text("messaging.operation.name", "app_outbox");
            publish.traceparent = span.context.header().to_str().map(str::to_owned).ok();
            tracer.end(span);
            ids.push(id.to_owned());
            batch.push(publish);
        }
        self.report_refused();
        if batch.is_empty() {
            return Ok(round);
        }
        let store = self.messaging.store().await.map_err(AppOutboxError::Store)?;
        let queues: Vec<String> = batch.iter().map(|p| p.queue.clone()).collect();
        let published = store.publish(batch).await.map_err(AppOutboxError::Outbox)?;
        // stored (or found stored before: a repeated relay); the rows can go
        txn.execute(&statements.delete, &[&ids]).await?;
        txn.commit().await?;
        for (queue, published) in queues.iter().zip(&published) {
            if let Published::Stored(_) = published {
                self.messaging.stored(queue);
            }
        }
        self.messaging.app_outbox_relayed(published.len() as u64);
        round.relayed = published.len();
        tracing::debug!(rows = round.relayed, "relayed from the app's outbox table");
        Ok(round)
    }

    /// Shows the rows passed over in `/readyz`, or that there are none.
    fn report_refused(&self) {
        let first = self.refused.iter().min_by_key(|(id, _)| id.as_str());
        let refused = first
            .map(|(id, refused)| (self.refused.len(), format!("row {id:?}: {}", refused.reason)));
        self.status.update(|s| s.refused = refused);
    }
}

/// `future`, or [`AppOutboxError::TimedOut`] after [`ROUND_TIMEOUT`].
async fn deadline<T>(future: impl Future<Output = T>) -> Result<T, AppOutboxError> {
    tokio::time::timeout(ROUND_TIMEOUT, future)
        .await
        .map_err(|_| AppOutboxError::TimedOut(ROUND_TIMEOUT))
}

/// The round's statements, prepared once per connection.
struct Statements {
    /// The oldest rows not refused, locked, skipping those another round holds.
    take: tokio_postgres::Statement,
    /// Of the rows taken with an ordering key, those with an older row of their key that this
    /// round does not hold.
    held_back: tokio_postgres::Statement,
    delete: tokio_postgres::Statement,
    /// Which of the given ids are still in the table.
    present: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(client: &Client, table: &TableName) -> Result<Self, tokio_postgres::Error> {
        let table = table.quoted();
        let key = "headers->>'outrigger-ordering-key'";
        // neither a refused row nor a row its key holds back: 500 of those at the head must
        // not starve the rest of the table
        let take = format!(
            "SELECT id, queue, payload::text, headers::text, {key} FROM {table} \
             WHERE NOT (id = ANY($2)) AND ({key} IS NULL OR NOT ({key} = ANY($3))) \
             ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED"
        );
        let held_back = format!(
            "SELECT o.id FROM {table} o WHERE o.id = ANY($1) AND EXISTS (\
               SELECT 1 FROM {table} e WHERE e.headers ? 'outrigger-ordering-key' \
                 AND e.{key} = o.{key} \
                 AND (e.created_at, e.id) < (o.created_at, o.id) AND NOT (e.id = ANY($1)))"
        );
        let delete = format!("DELETE FROM {table} WHERE id = ANY($1)");
        let present = format!("SELECT id FROM {table} WHERE id = ANY($1)");
        Ok(Statements {
            take: client.prepare(&take).await?,
            held_back: client.prepare(&held_back).await?,
            delete: client.prepare(&delete).await?,
            present: client.prepare(&present).await?,
        })
    }
}

#[derive(Debug, Default)]
struct Round {
    taken: usize,
    /// A row waits for an older row of its key that another replica's round holds.
    held_by_others: bool,
    relayed: usize,
}

/// Refuses a table that is missing or whose columns are not the DDL's.
async fn check_table(client: &Client, table: &TableName) -> Result<(), AppOutboxError> {
    let (schema, name) = match table.as_str().split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table.as_str()),
    };
    let rows = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = coalesce($1, current_schema()) AND table_name = $2",
            &[&schema, &name],
        )
        .await?;
    let problem = |problem: String| AppOutboxError::Table { table: table.clone(), problem };
    if rows.is_empty() {
        return Err(problem("does not exist".into()));
    }
    let columns: Vec<(String, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    for (column, wanted) in [
        ("id", "text"),
        ("queue", "text"),
        ("payload", "jsonb"),
        ("headers", "jsonb"),
        ("created_at", "timestamp with time zone"),
    ] {
        match columns.iter().find(|(name, _)| name == column) {
            None => return Err(problem(format!("has no column {column} ({wanted})"))),
            Some((_, found)) if found != wanted => {
                return Err(problem(format!("has column {column} as {found}, not {wanted}")));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// One row as PostgreSQL gave it: `payload` and `headers` as JSON text.
struct RowFields<'a> {
    id: &'a str,
    queue: &'a str,
    payload: &'a str,
    headers: Option<&'a str>,
}

impl RowFields<'_> {
    /// The publish this row asks for, or why it cannot be published.
    fn publish(&self) -> Result<Publish, String> {
        let queue: QueueName = self.queue.parse().map_err(|e| format!("queue: {e}"))?;
        if self.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(format!(
                "payload: {} bytes, over the {MAX_PAYLOAD_BYTES} a message may hold",
                self.payload.len()
            ));
        }
        let payload =
            RawValue::from_string(self.payload.to_owned()).map_err(|e| format!("payload: {e}"))?;
        let headers: serde_json::Map<String, serde_json::Value> = match self.headers {
            None | Some("null") => serde_json::Map::new(),
            Some(text) => serde_json::from_str(text)
                .map_err(|_| "headers: not a JSON object of strings".to_owned())?,
        };
        let header = |name: &str| -> Result<Option<String>, String> {
            // the lowercase name only: the table's SQL reads the ordering key by it
            match headers.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(value)) if valid_key(value) => {
                    Ok(Some(value.clone()))
                }
                Some(_) => Err(format!("headers.{name}: must be {KEY_RULE}")),
            }
        };
        let idempotency_key = header("idempotency-key")?;
        let ordering_key = header("outrigger-ordering-key")?;
        let traceparent = header("traceparent")?;
        if !valid_key(self.id) {
            return Err(format!("id: must be {KEY_RULE} (it is the message's Idempotency-Key)"));
        }
        Ok(Publish {
            queue: queue.as_str().to_owned(),
            payload,
            // the row's id unless it names a key: a repeated relay stores nothing new
            idempotency_key: Some(idempotency_key.unwrap_or_else(|| self.id.to_owned())),
            ordering_key,
            traceparent,
            tracestate: header("tracestate")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(
        id: &'a str,
        queue: &'a str,
        payload: &'a str,
        headers: Option<&'a str>,
    ) -> RowFields<'a> {
        RowFields { id, queue, payload, headers }
    }

    #[test]
    fn a_row_is_published_under_its_id_with_its_headers() {
        let headers = r#"{"outrigger-ordering-key":"order-7","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","other":"kept out"}"#;
        let publish = row("r-1", "orders", r#"{"n": 1}"#, Some(headers)).publish().unwrap();
        assert_eq!(publish.queue, "orders");
        assert_eq!(publish.payload.get(), r#"{"n": 1}"#);
        assert_eq!(publish.idempotency_key.as_deref(), Some("r-1"));
        assert_eq!(publish.ordering_key.as_deref(), Some("order-7"));
        assert!(publish.traceparent.is_some());
    }

    #[test]
    fn the_rows_own_idempotency_key_wins_over_its_id() {
        let headers = r#"{"idempotency-key":"charge-42","Outrigger-Ordering-Key":"ignored"}"#;
        let publish = row("r-1", "orders", "{}", Some(headers)).publish().unwrap();
        assert_eq!(publish.idempotency_key.as_deref(), Some("charge-42"));
        assert_eq!(publish.ordering_key, None, "names are lowercase, as the SQL reads them");
        let plain = row("r-2", "orders", "{}", Some("null")).publish().unwrap();
        assert_eq!(plain.idempotency_key.as_deref(), Some("r-2"));
    }

    #[test]
    fn a_row_that_cannot_be_published_says_why() {
        let cases = [
            (row("r", "bad queue!", "{}", None), "queue"),
            (row("r", "q", "{}", Some(r#"{"traceparent": 7}"#)), "headers.traceparent"),
            (row("r", "q", "{}", Some("[1]")), "headers"),
            (row("r\n", "q", "{}", None), "id"),
        ];
        for (fields, field) in cases {
            let reason = fields.publish().unwrap_err();
            assert!(reason.starts_with(field), "{reason}");
        }
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD_BYTES));
        assert!(row("r", "q", &big, None).publish().unwrap_err().starts_with("payload"));
    }

    #[test]
    fn the_ddl_in_the_docs_is_the_one_the_relay_expects() {
        let docs = include_str!("../../../docs/messaging.md");
        let ddl = ddl(&"outrigger_outbox".parse().unwrap());
        assert!(docs.contains(&ddl), "docs/messaging.md must hold, verbatim:\n{ddl}");
    }
}
