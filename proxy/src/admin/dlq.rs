//! The dead-letter API on the admin listener (loopback clients only, checked by the caller):
//!
//! - `GET /v1/dlq/{dlq}?limit=N&before=ID`: a page of dead letters, newest first, each with
//!   its reason and last error; `next` is the `before` of the following page;
//! - `GET /v1/dlq/{dlq}/{id}`: one whole envelope;
//! - `POST /v1/dlq/{dlq}/replay` with `{"ids": [...]}`, `{"all": true}`, `{"status": 500}` or
//!   `{"contains": "text"}` (the last two match the last error record; ids do not mix with
//!   them): back to the original queue, at most [`REPLAY_BATCH`] per [`REPLAY_PAUSE`]; ids
//!   that are not there come back as `missing`;
//! - `DELETE /v1/dlq/{dlq}/{id}` and `DELETE /v1/dlq/{dlq}` (purge).
//!
//! `{dlq}` is the dead-letter queue's own name, e.g. `orders_deadletter`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::Body;
use crate::messaging::Messaging;
use crate::messaging::envelope::{Envelope, MessageId};

/// Dead letters moved per step of a replay.
pub const REPLAY_BATCH: usize = 100;
/// The pause between two steps: a replay delivers at most 1000 messages a second to the queue.
pub const REPLAY_PAUSE: Duration = Duration::from_millis(100);
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;
const MAX_BODY: usize = 1024 * 1024;

/// Answers one `/v1/dlq/…` request.
pub async fn handle<B>(messaging: Option<&Messaging>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(messaging) = messaging else {
        return error(StatusCode::NOT_FOUND, "messaging is not configured");
    };
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let rest = path.strip_prefix("/v1/dlq/").unwrap_or("");
    let parts: Vec<&str> = rest.split('/').collect();
    if let Some(dlq) = parts.first().filter(|q| !q.is_empty() && !is_queue_name(q)) {
        let expected = "A-Z, a-z, 0-9, '.', '_' and '-', e.g. orders_deadletter";
        return error(
            StatusCode::BAD_REQUEST,
            &format!("{dlq:?} is not a queue name ({expected})"),
        );
    }
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, [dlq]) if !dlq.is_empty() => list(messaging, dlq, &query).await,
        (Method::GET, [dlq, id]) => match id.parse::<MessageId>() {
            Ok(id) => show(messaging, dlq, id).await,
            Err(e) => error(StatusCode::BAD_REQUEST, &format!("{id:?}: {e}")),
        },
        (Method::POST, [dlq, "replay"]) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body: {e}")),
            };
            replay(messaging, dlq, &body).await
        }
        (Method::DELETE, [dlq, id]) => match id.parse::<MessageId>() {
            Ok(id) => match messaging.dead_letter_delete(dlq, id).await {
                Ok(true) => ok(json!({ "deleted": id })),
                Ok(false) => error(StatusCode::NOT_FOUND, &format!("no dead letter {id} in {dlq}")),
                Err(e) => unavailable(&e),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, &format!("{id:?}: {e}")),
        },
        (Method::DELETE, [dlq]) if !dlq.is_empty() => {
            match messaging.dead_letter_purge(dlq).await {
                Ok(purged) => ok(json!({ "purged": purged })),
                Err(e) => unavailable(&e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "expected GET /v1/dlq/QUEUE[/ID], POST /v1/dlq/QUEUE/replay, DELETE /v1/dlq/QUEUE[/ID]",
        ),
    }
}

/// A queue name's characters (a dead-letter queue's name is built, so it may be long).
fn is_queue_name(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// One dead letter in a list: what an operator needs to decide.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    id: MessageId,
    dispatch_date: &'a str,
    original_queue: Option<&'a str>,
    reason: Option<&'a str>,
    attempts: Option<u64>,
    dead_lettered_at: Option<&'a str>,
    last_error: Option<&'a crate::messaging::envelope::ErrorRecord>,
}

fn summary(envelope: &Envelope) -> Summary<'_> {
    use crate::messaging::envelope::dead_letter_keys::*;
    let text = |key: &str| envelope.metadata.get(key).and_then(|v| v.as_str());
    Summary {
        id: envelope.id,
        dispatch_date: &envelope.dispatch_date,
        original_queue: text(ORIGINAL_QUEUE),
        reason: text(REASON),
        attempts: envelope.metadata.get(ATTEMPTS).and_then(|v| v.as_u64()),
        dead_lettered_at: text(DEAD_LETTERED_AT),
        last_error: envelope.error.last(),
    }
}

async fn list(messaging: &Messaging, dlq: &str, query: &str) -> Response<Body> {
    let mut limit = DEFAULT_LIMIT;
    let mut before = None;
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match key {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("limit must be 1 to {MAX_LIMIT}"),
                    );
                }
            },
            "before" => match value.parse::<MessageId>() {
                Ok(id) => before = Some(id),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("before: {e}")),
            },
            _ => {}
        }
    }
    match messaging.dead_letters(dlq, before, limit).await {
        Ok(page) => {
            let messages: Vec<Summary<'_>> = page.messages.iter().map(summary).collect();
            ok(json!({ "queue": dlq, "messages": messages, "next": page.next }))
        }
        Err(e) => unavailable(&e),
    }
}

async fn show(messaging: &Messaging, dlq: &str, id: MessageId) -> Response<Body> {
    match messaging.dead_letter_get(dlq, id).await {
        Ok(Some(envelope)) => {
            let mut res = Response::new(Body::full(envelope.to_json()));
            res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res
        }
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("no dead letter {id} in {dlq}")),
        Err(e) => unavailable(&e),
    }
}

/// Which dead letters a replay takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    #[serde(default)]
    ids: Vec<MessageId>,
    #[serde(default)]
    all: bool,
    /// The last error's status code.
    status: Option<u16>,
    /// Text in the last error's message.
    contains: Option<String>,
}

async fn replay(messaging: &Messaging, dlq: &str, body: &[u8]) -> Response<Body> {
    let selection: Selection = match serde_json::from_slice(body) {
        Ok(s) => s,
        Err(e) => {
            let expected = r#"{"ids":[...]}, {"all":true}, {"status":500} or {"contains":"text"}"#;
            return error(StatusCode::BAD_REQUEST, &format!("expected {expected}: {e}"));
        }
    };
    let filtered = selection.all || selection.status.is_some() || selection.contains.is_some();
    if selection.ids.is_empty() && !filtered {
        return error(StatusCode::BAD_REQUEST, "say which: ids, all, status or contains");
    }
    if !selection.ids.is_empty() && filtered {
        // {"ids": [x], "all": true} must not quietly replay everything
        return error(StatusCode::BAD_REQUEST, "ids do not mix with all, status or contains");
    }
    let ids = if filtered {
        match matching(messaging, dlq, &selection).await {
            Ok(ids) => ids,
            Err(e) => return unavailable(&e),
        }
    } else {
        let mut ids = selection.ids;
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    };
    let mut replayed = Vec::with_capacity(ids.len());
    // oldest first, so the queue gets them back in their original order
    for (n, chunk) in ids.chunks(REPLAY_BATCH).enumerate() {
        if n > 0 {
            tokio::time::sleep(REPLAY_PAUSE).await;
        }
        match messaging.dead_letter_replay(dlq, chunk.to_vec()).await {
            Ok(moved) => replayed.extend(moved),
            Err(e) => {
                tracing::error!(dead_letter_queue = dlq, error = %e, replayed = replayed.len(), "replay stopped");
                // say what did move: those are back in their queue, the rest are not
                let body =
                    json!({ "error": e.to_string(), "replayed": replayed.len(), "ids": replayed });
                let mut res = ok(body);
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return res;
            }
        }
    }
    tracing::info!(dead_letter_queue = dlq, replayed = replayed.len(), "dead letters replayed");
    // asked for by id and not moved: not there (deleted, expired, replayed meanwhile)
    let moved: std::collections::HashSet<MessageId> = replayed.iter().copied().collect();
    let missing: Vec<MessageId> = ids.into_iter().filter(|id| !moved.contains(id)).collect();
    ok(json!({ "replayed": replayed.len(), "ids": replayed, "missing": missing }))
}

/// Every dead letter of `dlq` the selection's filters match, oldest first.
async fn matching(
    messaging: &Messaging,
    dlq: &str,
    selection: &Selection,
) -> Result<Vec<MessageId>, crate::messaging::broker::BrokerError> {
    let mut ids = Vec::new();
    let mut before = None;
    loop {
        // a page of whole envelopes at a time (each up to 1 MiB of payload): keep it small
        let page = messaging.dead_letters(dlq, before, REPLAY_BATCH).await?;
        for envelope in &page.messages {
            let last = envelope.error.last();
            let status_ok =
                selection.status.is_none_or(|s| last.is_some_and(|e| e.status_code == Some(s)));
            let text_ok = selection
                .contains
                .as_deref()
                .is_none_or(|t| last.is_some_and(|e| e.message.contains(t)));
            if status_ok && text_ok {
                ids.push(envelope.id);
            }
        }
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    ids.reverse();
    Ok(ids)
}

/// A 200 with `body` as JSON (the admin API's answers).
pub(super) fn ok(body: serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Body::full(Bytes::from(
        serde_json::to_vec_pretty(&body).expect("serializes"),
    )));
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `status` with `{"error": reason}`.
pub(super) fn error(status: StatusCode, reason: &str) -> Response<Body> {
    let mut res = ok(json!({ "error": reason }));
    *res.status_mut() = status;
    res
}

fn unavailable(e: &crate::messaging::broker::BrokerError) -> Response<Body> {
    error(StatusCode::SERVICE_UNAVAILABLE, &crate::error::chain(e))
}

#[cfg(test)]
mod tests;
