//! Consuming a queue as this service's group: reading what is due (the group's retries,
//! messages another replica abandoned, then new ones), taking an ordering key's turn, and the
//! pipelines that settle an entry.

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};

use super::keys::{delayed, order_list, retries, stream, waiting_list};
use super::scripts::{ACQUIRE, PROMOTE, RELEASE};
use super::{Lease, PROMOTE_PER_READ, READ_BLOCK, Redis, store_error};
use crate::messaging::broker::{BrokerError, Leased, UnixMillis};
use crate::messaging::envelope::MessageId;

impl Redis {
    /// What is there for this consumer: its group's due retries and abandoned messages, then
    /// new ones (waiting up to [`READ_BLOCK`] for them when `wait` and nothing else was found).
    pub(super) async fn read_entries(
        &self,
        queue: &str,
        max: usize,
        now: UnixMillis,
        wait: bool,
    ) -> Result<Vec<Leased>, BrokerError> {
        let group = &self.inner.group;
        let (key, retry_key) = (stream(queue), retries(queue, group));
        let consumer = &self.inner.consumer;
        let mut conn = self.conn().await?;
        // this group's parked messages that are due go to its retry stream (any replica may)
        redis::cmd("EVAL")
            .arg(PROMOTE)
            .arg(2)
            .arg(delayed(queue, group))
            .arg(&retry_key)
            .arg(now)
            .arg(PROMOTE_PER_READ)
            .query_async::<()>(&mut conn)
            .await
            .map_err(store_error)?;
        // messages a replica took and never settled (it died): claimed after `claim_idle`
        let mut found = Vec::new();
        for stream_key in [&retry_key, &key] {
            if found.len() >= max {
                break;
            }
            let claim: Value = redis::cmd("XAUTOCLAIM")
                .arg(stream_key)
                .arg(group)
                .arg(consumer)
                .arg(self.inner.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(max - found.len())
                .query_async(&mut conn)
                .await
                .map_err(|e| self.forget_group_if_gone(queue, e))?;
            let claimed: redis::streams::StreamAutoClaimReply =
                redis::from_redis_value(claim).map_err(|e| store_error(e.into()))?;
            found.extend(self.lease(queue, stream_key, claimed.claimed, true));
        }
        if found.len() >= max {
            return Ok(found);
        }
        // new messages: the group's retries first, then the queue
        if wait && found.is_empty() {
            // nothing yet: wait a moment on both (on a connection of its own: a blocked read
            // stalls the commands behind it), so a retry released by another replica wakes it
            // as a new message does; a broker may hand out up to twice `max` here
            let options = StreamReadOptions::default()
                .group(group, consumer)
                .count(max)
                .block(READ_BLOCK.as_millis() as usize);
            let mut reader = self.reader(queue).await?;
            let reply: Option<StreamReadReply> = reader
                .xread_options(&[&retry_key, &key], &[">", ">"], &options)
                .await
                .map_err(|e| self.forget_group_if_gone(queue, e))?;
            for read in reply.map(|r| r.keys).unwrap_or_default() {
                found.extend(self.lease(queue, &read.key, read.ids, false));
            }
            return Ok(found);
        }
        for stream_key in [&retry_key, &key] {
            let remaining = max - found.len();
            if remaining == 0 {
                break;
            }
            let options = StreamReadOptions::default().group(group, consumer).count(remaining);
            let reply: Option<StreamReadReply> = conn
                .xread_options(&[stream_key], &[">"], &options)
                .await
                .map_err(|e| self.forget_group_if_gone(queue, e))?;
            for read in reply.map(|r| r.keys).unwrap_or_default() {
                found.extend(self.lease(queue, &read.key, read.ids, false));
            }
        }
        Ok(found)
    }

    /// Of messages read for an ordered subscription, those whose turn it is (each key's
    /// earliest unsettled message, by the order the relay recorded); the others are
    /// acknowledged into their key's waiting list, from which settling the one before them
    /// moves them to the retry stream.
    pub(super) async fn in_turn(
        &self,
        queue: &str,
        found: Vec<Leased>,
    ) -> Result<Vec<Leased>, BrokerError> {
        let group = &self.inner.group;
        let mut go = Vec::with_capacity(found.len());
        for leased in found {
            let Some(key) = leased.envelope.ordering_key().map(str::to_owned) else {
                go.push(leased);
                continue;
            };
            let id = leased.envelope.id;
            let member = format!(
                "{id}\n{}\n{}",
                leased.attempts,
                String::from_utf8_lossy(&leased.envelope.to_json())
            );
            let mut conn = self.conn().await?;
            let turn: i64 = redis::cmd("EVAL")
                .arg(ACQUIRE)
                .arg(2)
                .arg(order_list(queue, group, &key))
                .arg(waiting_list(queue, group, &key))
                .arg(id.to_string())
                .arg(member)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            if turn == 1 {
                let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(lease) = leases.get_mut(&id.as_u128()) {
                    lease.ordering_key = Some(key);
                }
                drop(leases);
                go.push(leased);
            } else if let Some(lease) = self.take_lease(id) {
                // it waits in its key's list now: the stream entry is done with
                let mut pipe = redis::pipe();
                pipe.atomic();
                self.settle_entry(&mut pipe, &lease);
                pipe.query_async::<()>(&mut conn).await.map_err(store_error)?;
            }
        }
        Ok(go)
    }

    /// Adds to `pipe` the acknowledgement of a leased entry (and, in the group's own retry
    /// stream, its removal: no other group reads it).
    pub(super) fn settle_entry(&self, pipe: &mut redis::Pipeline, lease: &Lease) {
        pipe.cmd("XACK").arg(&lease.stream).arg(&self.inner.group).arg(&lease.entry).ignore();
        if lease.retry {
            pipe.cmd("XDEL").arg(&lease.stream).arg(&lease.entry).ignore();
        }
    }

    /// The entry settled for good (acknowledged or dead-lettered): with an ordering key, the
    /// key's next message may go.
    pub(super) fn settle(&self, pipe: &mut redis::Pipeline, lease: &Lease, id: MessageId) {
        self.settle_entry(pipe, lease);
        if let Some(key) = &lease.ordering_key {
            let group = &self.inner.group;
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(3)
                .arg(order_list(&lease.queue, group, key))
                .arg(waiting_list(&lease.queue, group, key))
                .arg(retries(&lease.queue, group))
                .arg(id.to_string())
                .ignore();
        }
    }
}
