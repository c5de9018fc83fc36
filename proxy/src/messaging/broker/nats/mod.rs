//! The `nats://` broker: NATS JetStream (issue 22). **Work in progress, not wired to the
//! config yet**: the connection, each queue's stream made (or an existing one checked), and the
//! relay. The queue side (reads through a durable pull consumer, park as a state subject plus a
//! nak with delay, dead letters, ordering) follows docs/design/nats-jetstream.md.

mod names;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::Unrelayed;
use crate::messaging::envelope::Envelope;

/// Connecting, and each JetStream request, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a NATS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats: connecting failed")]
    Connect(#[source] async_nats::ConnectError),
    #[error("nats: reading stream {stream} failed")]
    Stream {
        stream: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "nats: stream {stream} exists with {field} {found}, and Outrigger needs {wanted}: change \
         or remove the stream (Outrigger never changes a stream it did not make that way)"
    )]
    Incompatible { stream: String, field: &'static str, found: String, wanted: String },
    #[error("nats: publishing to {subject} failed")]
    Publish {
        subject: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The NATS broker; cheap to clone.
#[derive(Clone)]
pub struct Nats {
    js: jetstream::Context,
    dedup_window: Duration,
    /// Queues whose stream this process has made or checked.
    streams: std::sync::Arc<Mutex<HashSet<String>>>,
}

impl Nats {
    /// Connects to `servers` (reconnecting by itself after); the client retries the first
    /// connection too, so NATS being down at startup is not an error.
    pub async fn connect(servers: Vec<String>, dedup_window: Duration) -> Result<Self, NatsError> {
        let addrs: Vec<async_nats::ServerAddr> =
            servers.iter().filter_map(|s| s.parse().ok()).collect();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(addrs)
            .await
            .map_err(NatsError::Connect)?;
        Ok(Nats { js: jetstream::new(client), dedup_window, streams: Default::default() })
    }

    /// The stream `queue`'s messages go to, as Outrigger needs it: made if missing, refused
    /// (never changed) if it exists with settings that would break a promise.
    async fn ensure_stream(&self, queue: &str) -> Result<(), NatsError> {
        if self.streams.lock().unwrap_or_else(|e| e.into_inner()).contains(queue) {
            return Ok(());
        }
        let name = names::queue_stream(queue);
        let wanted = stream::Config {
            name: name.clone(),
            subjects: vec![names::subject(queue)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: self.dedup_window,
            allow_direct: true,
            ..Default::default()
        };
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Stream {
            stream: name.clone(),
            cause,
        };
        match self.js.get_stream(&name).await {
            Ok(mut existing) => {
                let found = existing.info().await.map_err(|e| failed(e.into()))?.config.clone();
                check(&name, &found, &wanted)?;
            }
            Err(error) if is_not_found(&error) => {
                self.js.create_stream(wanted).await.map_err(|e| failed(e.into()))?;
            }
            Err(error) => return Err(failed(error.into())),
        }
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).insert(queue.to_owned());
        Ok(())
    }

    /// Publishes `batch` to its queues' subjects, each with its id as `Nats-Msg-Id` (a message
    /// relayed again within the stream's duplicate window is stored once), and waits for every
    /// acknowledgement. A queue whose stream refuses holds back only its own messages.
    pub async fn relay(&self, batch: &[Envelope]) -> Result<(), Unrelayed> {
        let mut unrelayed: Option<Unrelayed> = None;
        let mut queues: Vec<&str> = batch.iter().map(|e| e.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        for queue in queues {
            let sent = self.relay_queue(queue, batch.iter().filter(|e| e.queue == queue)).await;
            if let Err(error) = sent {
                let error = super::BrokerError::Nats(std::sync::Arc::new(error));
                let failed =
                    unrelayed.get_or_insert_with(|| Unrelayed { queues: HashSet::new(), error });
                failed.queues.insert(queue.to_owned());
            }
        }
        unrelayed.map_or(Ok(()), Err)
    }

    async fn relay_queue<'a>(
        &self,
        queue: &str,
        batch: impl Iterator<Item = &'a Envelope>,
    ) -> Result<(), NatsError> {
        self.ensure_stream(queue).await?;
        let subject = names::subject(queue);
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: subject.clone(),
            cause,
        };
        let mut acks = Vec::new();
        for envelope in batch {
            let message = jetstream::message::PublishMessage::build()
                .payload(envelope.to_json().into())
                .message_id(envelope.id.to_string());
            let ack = self
                .js
                .send_publish(subject.clone(), message)
                .await
                .map_err(|e| failed(e.into()))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| failed(e.into()))?;
        }
        Ok(())
    }
}

fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Refuses an existing stream whose settings would break a promise; accepts more (replicas,
/// limits it does not reach).
fn check(name: &str, found: &stream::Config, wanted: &stream::Config) -> Result<(), NatsError> {
    let refuse = |field: &'static str, found: String, wanted: String| {
        Err(NatsError::Incompatible { stream: name.to_owned(), field, found, wanted })
    };
    if found.storage != wanted.storage {
        return refuse("storage", format!("{:?}", found.storage), format!("{:?}", wanted.storage));
    }
    if found.retention != wanted.retention {
        let (f, w) = (format!("{:?}", found.retention), format!("{:?}", wanted.retention));
        return refuse("retention", f, w);
    }
    if found.subjects != wanted.subjects {
        return refuse("subjects", found.subjects.join(","), wanted.subjects.join(","));
    }
    if found.duplicate_window < wanted.duplicate_window {
        let (f, w) = (found.duplicate_window, wanted.duplicate_window);
        return refuse("duplicate_window", format!("{f:?}"), format!("at least {w:?}"));
    }
    Ok(())
}
