//! Ordering keys across replicas, on NATS 2.9 which has no pinned consumers
//! (docs/design/nats-jetstream.md §3c).
//!
//! - A keyed message is published to its key's own subject, so the server indexes each key:
//!   "the key's first message at or after sequence x" is one read (from the stream's leader,
//!   as every read here: a follower may lag behind what was just confirmed).
//! - Each consumer group keeps one record per key, [`Turns`], in the queue's state stream:
//!   every message of the key below `next` is settled. It is only ever written by compare and
//!   set (the subject's last sequence), so one record decides every race between replicas.
//! - A delivery whose key has an older unsettled message is not handed to the app: it is nak'd
//!   with a safety delay and noted in `waiting`. Settling the head moves `next` past it and nak's
//!   the next message's noted delivery with no delay, so it comes at once.
//! - `next` moves before the head's ack: a crash in between redelivers a message below `next`,
//!   which is acknowledged without going to the app again.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, context::PublishErrorKind, stream::RawMessageErrorKind};

use super::{Nats, NatsError, names};

/// How often one read-modify-write of a key's record is tried while other replicas' writes
/// come between.
const TRIES: usize = 64;

/// Where one ordering key stands for one consumer group.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Turns {
    /// Every message of the key below this stream sequence is settled.
    next: u64,
    /// Deliveries put back because their turn had not come: stream sequence → the delivery's
    /// reply subject, to nak when its turn comes.
    #[serde(default)]
    waiting: BTreeMap<u64, String>,
    /// The head handed to an app, and since when (Unix ms): another delivery of it meanwhile
    /// (NATS redelivers on a nak of an older delivery's reply, whichever delivery is current)
    /// is put back, not handed to a second app. Taken over after `claim_idle`: its holder died.
    #[serde(default)]
    held: Option<(u64, u64)>,
}

/// Whether a delivered message of an ordering key may go to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// It is the key's oldest unsettled message.
    Yours,
    /// It is, and another delivery of it is with an app now: it is put back until that one
    /// is settled (or its holder is gone).
    Held,
    /// An older message of its key is unsettled: it waits.
    NotYet,
    /// It was settled already (acknowledged or dead-lettered, the ack lost in a crash).
    Settled,
}

/// The queue and key a keyed delivery belongs to.
pub(super) struct Keyed<'a> {
    pub(super) queue: &'a str,
    /// The message's subject: `outrigger-k.<queue>.<key token>`.
    pub(super) subject: &'a str,
    pub(super) seq: u64,
}

impl Keyed<'_> {
    /// `message`'s key, when it was published with one.
    pub(super) fn of<'a>(
        queue: &'a str,
        message: &'a jetstream::Message,
        seq: u64,
    ) -> Option<Keyed<'a>> {
        message.subject.starts_with("outrigger-k.").then_some(Keyed {
            queue,
            subject: message.subject.as_str(),
            seq,
        })
    }

    fn token(&self) -> &str {
        self.subject.rsplit('.').next().unwrap_or_default()
    }
}

impl Nats {
    /// Whether `keyed`'s delivery may go to the app now.
    pub(super) async fn take_turn(&self, keyed: &Keyed<'_>) -> Result<Turn, NatsError> {
        let record = names::turn_subject(keyed.queue, &self.inner.group, keyed.token());
        for _ in 0..TRIES {
            let (rev, mut turns) = self.turns(keyed.queue, &record).await?;
            match self.head(keyed, turns.next.max(1)).await? {
                Some(head) if head < keyed.seq => return Ok(Turn::NotYet),
                Some(head) if head == keyed.seq => {
                    let now = unix_millis();
                    let claim_idle = self.inner.claim_idle.as_millis() as u64;
                    if let Some((seq, since)) = turns.held
                        && seq == keyed.seq
                        && now.saturating_sub(since) < claim_idle
                    {
                        return Ok(Turn::Held);
                    }
                    // noted as waiting before: a settle must not nak this delivery again
                    turns.waiting.remove(&keyed.seq);
                    turns.held = Some((keyed.seq, now));
                    if !self.store_turns(keyed.queue, &record, rev, &turns).await? {
                        continue;
                    }
                    return Ok(Turn::Yours);
                }
                // below the key's first unsettled message, or gone from the stream
                _ => return Ok(Turn::Settled),
            }
        }
        Err(NatsError::Contended { subject: record })
    }

    /// Notes that `keyed`'s delivery, already nak'd with a safety delay, waits for its turn
    /// under `reply`; if its turn came meanwhile, nak's it again to come at once.
    pub(super) async fn wait_turn(&self, keyed: &Keyed<'_>, reply: &str) -> Result<(), NatsError> {
        let record = names::turn_subject(keyed.queue, &self.inner.group, keyed.token());
        for _ in 0..TRIES {
            let (rev, mut turns) = self.turns(keyed.queue, &record).await?;
            match self.head(keyed, turns.next.max(1)).await? {
                Some(head) if head < keyed.seq => {
                    turns.waiting.insert(keyed.seq, reply.to_owned());
                    if self.store_turns(keyed.queue, &record, rev, &turns).await? {
                        return Ok(());
                    }
                }
                _ => return self.nak_now(reply).await,
            }
        }
        Err(NatsError::Contended { subject: record })
    }

    /// Settles `keyed` for its key: `next` moves past it, and the key's next message comes at
    /// once if a delivery of it waits.
    pub(super) async fn end_turn(&self, keyed: &Keyed<'_>) -> Result<(), NatsError> {
        let record = names::turn_subject(keyed.queue, &self.inner.group, keyed.token());
        for _ in 0..TRIES {
            let (rev, mut turns) = self.turns(keyed.queue, &record).await?;
            if turns.next > keyed.seq {
                return Ok(()); // settled before (a redelivery after a lost ack)
            }
            turns.next = keyed.seq + 1;
            turns.held = None;
            turns.waiting.retain(|&seq, _| seq > keyed.seq);
            let next = self.head(keyed, keyed.seq + 1).await?;
            let release = next.and_then(|next| turns.waiting.remove(&next));
            if self.store_turns(keyed.queue, &record, rev, &turns).await? {
                if let Some(reply) = release
                    && let Err(error) = self.nak_now(&reply).await
                {
                    // it comes back after its safety delay instead
                    tracing::debug!(subject = keyed.subject, error = %crate::error::chain(&error), "releasing the next message of an ordering key failed");
                }
                return Ok(());
            }
        }
        Err(NatsError::Contended { subject: record })
    }

    /// Gives up the hold of `keyed`, parked for a retry: its next delivery is handed to an app
    /// again (the key's later messages still wait: `next` does not move).
    pub(super) async fn drop_hold(&self, keyed: &Keyed<'_>) -> Result<(), NatsError> {
        let record = names::turn_subject(keyed.queue, &self.inner.group, keyed.token());
        for _ in 0..TRIES {
            let (rev, mut turns) = self.turns(keyed.queue, &record).await?;
            if turns.held.is_none_or(|(seq, _)| seq != keyed.seq) {
                return Ok(());
            }
            turns.held = None;
            if self.store_turns(keyed.queue, &record, rev, &turns).await? {
                return Ok(());
            }
        }
        Err(NatsError::Contended { subject: record })
    }

    /// The sequence of the first message of `keyed`'s key at or after `from`. Read from the
    /// stream's leader, as every read here: a follower of a replicated stream answering a
    /// direct get may not have a message just published yet, and its key's turn would pass
    /// it by.
    async fn head(&self, keyed: &Keyed<'_>, from: u64) -> Result<Option<u64>, NatsError> {
        let stream = self.ensure(keyed.queue).await?.stream;
        match stream.get_first_raw_message_by_subject(keyed.subject, from).await {
            Ok(message) => Ok(Some(message.sequence)),
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(NatsError::Stream {
                stream: names::queue_stream(keyed.queue),
                cause: error.into(),
            }),
        }
    }

    /// A key's record and its revision (0: none yet), from the leader.
    async fn turns(&self, queue: &str, record: &str) -> Result<(u64, Turns), NatsError> {
        let stream = self.state_stream(queue).await?;
        match stream.get_last_raw_message_by_subject(record).await {
            Ok(found) => {
                let turns = serde_json::from_slice(&found.payload).map_err(|e| {
                    NatsError::Stream { stream: names::state_stream(queue), cause: e.into() }
                })?;
                Ok((found.sequence, turns))
            }
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {
                Ok((0, Turns::default()))
            }
            Err(error) => {
                Err(NatsError::Stream { stream: names::state_stream(queue), cause: error.into() })
            }
        }
    }

    /// Writes a key's record if it is still at revision `rev`; false when another write came
    /// first.
    async fn store_turns(
        &self,
        queue: &str,
        record: &str,
        rev: u64,
        turns: &Turns,
    ) -> Result<bool, NatsError> {
        self.state_stream(queue).await?;
        let failed = |cause: Box<dyn std::error::Error + Send + Sync>| NatsError::Publish {
            subject: record.to_owned(),
            cause,
        };
        let body = serde_json::to_vec(turns).expect("a key's record serializes");
        let message = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .expected_last_subject_sequence(rev);
        let js = self.js().await?;
        let sent = js.send_publish(record.to_owned(), message).await;
        match sent.map_err(|e| failed(e.into()))?.await {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(error) => Err(failed(error.into())),
        }
    }

    /// Nak's the delivery that answers to `reply` with no delay: it comes again at once.
    async fn nak_now(&self, reply: &str) -> Result<(), NatsError> {
        let client = self.js().await?.client();
        let answered = client.request(reply.to_owned(), "-NAK".into()).await;
        answered
            .map(drop)
            .map_err(|e| NatsError::Publish { subject: reply.to_owned(), cause: e.into() })
    }
}

fn unix_millis() -> u64 {
    crate::messaging::envelope::unix_millis(std::time::SystemTime::now())
}
