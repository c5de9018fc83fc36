//! `outrigger dlq …`: the dead-letter API of a running sidecar's admin port (loopback), as
//! readable tables, or as the API's JSON with `--json`. `purge QUEUE ID…` is one
//! `DELETE /v1/dlq/QUEUE/ID` per id, reported like a replay (`purged`, `missing`).
//! `outrigger circuit …`: forces an upstream's breaker through the same port.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::error::chain;
use crate::messaging::envelope::MessageId;

/// What `outrigger dlq` was asked to do.
#[derive(Debug, Clone)]
pub enum DlqCommand {
    List {
        queue: String,
        limit: usize,
        before: Option<String>,
    },
    Show {
        queue: String,
        id: String,
    },
    Replay {
        queue: String,
        selection: Value,
    },
    Delete {
        queue: String,
        id: String,
    },
    /// Every dead letter of the queue.
    Purge {
        queue: String,
    },
    /// These dead letters of the queue, one `DELETE` each; those not there are reported.
    PurgeIds {
        queue: String,
        ids: Vec<String>,
    },
}

/// Runs `command` against the admin endpoint `admin` (e.g. `http://127.0.0.1:9901`); what to
/// print, or a one-line error.
pub async fn dlq(admin: &str, command: DlqCommand, as_json: bool) -> Result<String, String> {
    let admin = admin.trim_end_matches('/');
    let (method, path, body) = match &command {
        DlqCommand::List { queue, limit, before } => {
            let before = before.as_ref().map(|b| format!("&before={b}")).unwrap_or_default();
            (Method::GET, format!("/v1/dlq/{queue}?limit={limit}{before}"), None)
        }
        DlqCommand::Show { queue, id } => (Method::GET, format!("/v1/dlq/{queue}/{id}"), None),
        DlqCommand::Replay { queue, selection } => {
            (Method::POST, format!("/v1/dlq/{queue}/replay"), Some(selection.to_string()))
        }
        DlqCommand::Delete { queue, id } => (Method::DELETE, format!("/v1/dlq/{queue}/{id}"), None),
        DlqCommand::Purge { queue } => (Method::DELETE, format!("/v1/dlq/{queue}"), None),
        DlqCommand::PurgeIds { queue, ids } => return purge_ids(admin, queue, ids, as_json).await,
    };
    let answer = call(admin, method, &path, body).await?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&answer).expect("serializes"));
    }
    Ok(match command {
        DlqCommand::List { queue, .. } => table(&queue, &answer),
        DlqCommand::Show { .. } => envelope(&answer),
        DlqCommand::Replay { queue, .. } => {
            let done = format!(
                "replayed {} dead letter(s) from {queue} to their queue",
                answer["replayed"]
            );
            done + &not_there(&queue, &answer["missing"])
        }
        DlqCommand::Delete { queue, id } => format!("deleted {id} from {queue}"),
        DlqCommand::Purge { queue } => {
            format!("purged {} dead letter(s) from {queue}", answer["purged"])
        }
        DlqCommand::PurgeIds { .. } => unreachable!("purge_ids answers it"),
    })
}

/// `outrigger circuit open|closed|auto UPSTREAM`: `state` is the API's word; one line saying
/// what the breaker does now.
pub async fn circuit(admin: &str, upstream: &str, state: &str) -> Result<String, String> {
    let admin = admin.trim_end_matches('/');
    let path = format!("/v1/upstreams/{upstream}/circuit");
    let answer =
        call(admin, Method::POST, &path, Some(json!({ "state": state }).to_string())).await?;
    let now = answer["state"].as_str().unwrap_or("?");
    Ok(match answer["forced"].as_str() {
        Some(forced) => format!(
            "the circuit to {upstream} is forced {forced} (until `outrigger circuit auto {upstream}`)"
        ),
        None => format!("the circuit to {upstream} follows its policy again: {now}"),
    })
}

/// `purge QUEUE ID…`: every id is checked before any is removed, so a typo removes nothing.
async fn purge_ids(
    admin: &str,
    queue: &str,
    ids: &[String],
    as_json: bool,
) -> Result<String, String> {
    let mut unique: Vec<&str> = Vec::with_capacity(ids.len());
    for id in ids {
        id.parse::<MessageId>().map_err(|e| format!("{id:?}: {e}"))?;
        if !unique.contains(&id.as_str()) {
            unique.push(id);
        }
    }
    // a 404 on one id means "not there" only once the queue itself answers: without this, an
    // admin port with no messaging would report every id as missing
    call(admin, Method::GET, &format!("/v1/dlq/{queue}?limit=1"), None).await?;
    let (mut purged, mut missing) = (0, Vec::new());
    for id in unique {
        let path = format!("/v1/dlq/{queue}/{id}");
        match request(admin, Method::DELETE, &path, None).await? {
            (status, _) if status.is_success() => purged += 1,
            (StatusCode::NOT_FOUND, _) => missing.push(id),
            (status, answer) => return Err(refusal(status, &answer)),
        }
    }
    let answer = json!({ "purged": purged, "missing": missing });
    if as_json {
        return Ok(serde_json::to_string_pretty(&answer).expect("serializes"));
    }
    Ok(format!("purged {purged} dead letter(s) from {queue}")
        + &not_there(queue, &answer["missing"]))
}

/// The line naming the ids that were not in the queue, if any.
fn not_there(queue: &str, missing: &Value) -> String {
    let missing: Vec<&str> = missing
        .as_array()
        .map(|m| m.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        return String::new();
    }
    format!("\nnot in {queue} (deleted, expired or replayed): {}", missing.join(" "))
}

/// One admin API call whose answer must be a success.
async fn call(
    admin: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<Value, String> {
    match request(admin, method, path, body).await? {
        (status, answer) if status.is_success() => Ok(answer),
        (status, answer) => Err(refusal(status, &answer)),
    }
}

/// The API's refusal as one line: `404: no dead letter …`.
fn refusal(status: StatusCode, answer: &Value) -> String {
    let reason = answer["error"].as_str().unwrap_or("no reason given");
    format!("{}: {reason}", status.as_u16())
}

/// One admin API call: its status and JSON answer, or why there was none.
async fn request(
    admin: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<(StatusCode, Value), String> {
    let uri = format!("{admin}{path}");
    let req = Request::builder()
        .method(method)
        .uri(&uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("{uri}: {e} (--admin takes http://HOST:PORT)"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let res = client
        .request(req)
        .await
        .map_err(|e| format!("cannot reach the admin endpoint {admin}: {}", chain(&e)))?;
    let status = res.status();
    let bytes = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let answer: Value = serde_json::from_slice(&bytes)
        .map_err(|_| format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()))?;
    Ok((status, answer))
}

/// A page as a table: one line per dead letter, newest first.
fn table(queue: &str, page: &Value) -> String {
    let messages = page["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() {
        if queue.ends_with("_deadletter") {
            return format!("{queue}: no dead letters");
        }
        // the commonest slip: the queue's name instead of its dead-letter queue's
        return format!(
            "{queue}: no dead letters (the default dead-letter queue of {queue} is {queue}_deadletter)"
        );
    }
    let mut out = format!(
        "{:<26}  {:<24}  {:>8}  {:<40}  LAST ERROR\n",
        "ID", "DEAD-LETTERED", "ATTEMPTS", "REASON"
    );
    for m in &messages {
        let last = &m["last_error"];
        let status = last["status_code"].as_u64().map_or("-".to_owned(), |s| s.to_string());
        let message: String = last["message"].as_str().unwrap_or("").chars().take(50).collect();
        out += &format!(
            "{:<26}  {:<24}  {:>8}  {:<40}  {status} {}\n",
            m["id"].as_str().unwrap_or(""),
            m["dead_lettered_at"].as_str().unwrap_or("-"),
            m["attempts"].as_u64().map_or("-".to_owned(), |a| a.to_string()),
            m["reason"].as_str().unwrap_or("-"),
            message.replace('\n', " "),
        );
    }
    if let Some(next) = page["next"].as_str() {
        out += &format!("(more: --before {next})\n");
    }
    out.trim_end().to_owned()
}

/// One envelope, readable: where it came from, why it is here, its payload and its history.
fn envelope(e: &Value) -> String {
    let meta = &e["metadata"];
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let mut out = String::new();
    for (label, value) in [
        ("id", &e["id"]),
        ("queue", &e["queue"]),
        ("original queue", &meta["original_queue"]),
        ("subscriber", &meta["subscriber"]),
        ("published", &e["dispatch_date"]),
        ("dead-lettered", &meta["dead_lettered_at"]),
        ("attempts", &meta["attempts"]),
        ("reason", &meta["reason"]),
    ] {
        if !value.is_null() {
            out += &format!("{label:<15} {}\n", text(value));
        }
    }
    out += &format!("{:<15} {}\n", "payload", e["payload"]);
    let errors = e["error"].as_array().cloned().unwrap_or_default();
    out += &format!("errors ({}):\n", errors.len());
    for (n, r) in errors.iter().enumerate() {
        let status = r["status_code"].as_u64().map_or("-".to_owned(), |s| s.to_string());
        out += &format!("  {}. {} {status} {}\n", n + 1, text(&r["date"]), text(&r["message"]));
        if let Some(trace) = r["stack_trace"].as_str().filter(|t| !t.is_empty()) {
            out += &format!("     {}\n", trace.replace('\n', "\n     "));
        }
    }
    out.trim_end().to_owned()
}

/// The replay selection `outrigger dlq replay` sends.
pub fn selection(
    ids: Vec<String>,
    all: bool,
    status: Option<u16>,
    contains: Option<String>,
) -> Value {
    let mut selection = json!({});
    if !ids.is_empty() {
        selection["ids"] = json!(ids);
    }
    if all {
        selection["all"] = json!(true);
    }
    if let Some(status) = status {
        selection["status"] = json!(status);
    }
    if let Some(text) = contains {
        selection["contains"] = json!(text);
    }
    selection
}
