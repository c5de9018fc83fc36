//! Messaging (DESIGN.md "Messaging"): the app publishes to `POST /v1/publish/{queue}` on the
//! outbound listener, and the message is durable in the store before it gets its 202.
//!
//! The store (the `embedded` broker, a redb file in `messaging.data_dir`) opens at startup when
//! its file already exists, so a restarted sidecar reports what it still holds; otherwise at the
//! first publish, so a sidecar that never publishes never writes to disk; with subscriptions,
//! at startup. [`deliver`] runs one dispatcher per subscription; a publish wakes its queue's.
//!
//! With `messaging.app_outbox`, [`app_outbox`] moves the rows the app commits to its own
//! PostgreSQL table into the store, as publishes.
//!
//! With `broker: redis://…` the store is the outbox and the subscribers' memory of ids whose
//! acknowledgement failed: [`relay`] moves what it holds to Redis, and the dispatchers consume
//! from Redis.

pub mod app_outbox;
pub mod broker;
pub mod deliver;
pub mod envelope;
pub mod publish;
pub mod relay;
#[cfg(test)]
pub(crate) mod scratch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outrigger_config as config;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::JoinSet;

use crate::error::chain;
use crate::messaging::broker::embedded::{self, Embedded, OpenCause, OpenError};
use crate::messaging::broker::redis as redis_broker;
use crate::messaging::broker::{
    AnyQueue, AnyRemote, BrokerError, DeadLetterPage, Lane, Queue, QueueDepth, Remote,
};
use crate::messaging::envelope::{Envelope, MessageId};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::metrics::{MAX_QUEUE_SERIES, OTHER_QUEUES};
use crate::telemetry::trace::Tracer;

/// How often dead letters past `dead_letter_retention.max_age` are looked for on an idle store.
pub const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// The sidecar's messaging: its store, opened once, and its metrics.
#[derive(Debug)]
pub struct Messaging {
    data_dir: PathBuf,
    dedup_window: Duration,
    retention: embedded::Retention,
    store: OnceCell<Embedded>,
    metrics: Metrics,
    pending: IntGauge,
    /// `outrigger_messages_published_total{queue}` handles, made at a queue's first message.
    published: RwLock<HashMap<Box<str>, IntCounter>>,
    /// Each subscribed queue's dispatcher wake-up, notified by a publish to it.
    wakers: HashMap<Box<str>, Arc<Notify>>,
    subscriptions: Vec<config::Subscription>,
    /// With a remote broker (`broker: redis://…`): where messages are relayed and consumed.
    remote: Option<AnyRemote>,
    relay_wake: Arc<Notify>,
    relay_status: Arc<relay::Status>,
    /// `messaging.app_outbox`, and what its relay last saw.
    app_outbox: Option<(config::AppOutbox, Arc<app_outbox::Status>)>,
    app_outbox_relayed: IntCounter,
    /// Which subscriptions are paused because the app refuses connections.
    pauses: Arc<deliver::pause::Pauses>,
    tracer: Tracer,
    /// The publish buffer and body deadline, from `outbound.limits`.
    publish: publish::PublishLimits,
}

/// `dead_letter_retention` in the brokers' units.
pub(crate) fn retention(cfg: &config::Messaging) -> embedded::Retention {
    embedded::Retention {
        max_messages: cfg.dead_letter_retention.max_messages,
        max_age_ms: cfg.dead_letter_retention.max_age.get().as_millis() as u64,
    }
}

/// Why messaging could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] OpenError),
    #[error(transparent)]
    Broker(#[from] redis_broker::ConnectError),
}

impl Messaging {
    /// Messaging as configured for service `service` (the Redis consumer group), its publishes
    /// held to `publish`; opens the store now if `data_dir` already holds one, or a broker or
    /// subscriptions need it.
    pub async fn start(
        cfg: &config::Messaging,
        service: &str,
        metrics: &Metrics,
        tracer: Tracer,
        publish: publish::PublishLimits,
    ) -> Result<Arc<Self>, StartError> {
        let remote = AnyRemote::from_config(cfg, service, retention(cfg))?;
        let messaging = Arc::new(Messaging {
            data_dir: cfg.data_dir.clone(),
            dedup_window: cfg.dedup_window.get(),
            retention: retention(cfg),
            store: OnceCell::new(),
            metrics: metrics.clone(),
            pending: metrics.outbox_pending(),
            published: RwLock::new(HashMap::new()),
            // every lane of a subscription wakes its one dispatcher
            wakers: cfg
                .subscriptions
                .iter()
                .flat_map(|s| {
                    let wake = Arc::new(Notify::new());
                    s.lanes().into_iter().map(move |lane| (Box::from(lane.as_str()), wake.clone()))
                })
                .collect(),
            subscriptions: cfg.subscriptions.clone(),
            remote,
            relay_wake: Arc::new(Notify::new()),
            relay_status: Arc::default(),
            app_outbox: cfg.app_outbox.clone().map(|outbox| (outbox, Arc::default())),
            app_outbox_relayed: metrics.app_outbox_relayed(),
            pauses: Arc::default(),
            tracer,
            publish,
        });
        // a subscriber needs the store on every broker: it remembers the ids whose
        // acknowledgement failed, so that a restart does not deliver them again
        let needed = !cfg.subscriptions.is_empty();
        if needed || cfg.data_dir.join(embedded::FILE_NAME).exists() {
            messaging.store().await?;
        }
        Ok(messaging)
    }

    /// The store, opened on first use (in a blocking task: opening may repair the file).
    pub async fn store(&self) -> Result<&Embedded, OpenError> {
        self.store
            .get_or_try_init(|| {
                let (dir, window, retention) =
                    (self.data_dir.clone(), self.dedup_window, self.retention);
                let metrics = embedded::StoreMetrics {
                    pending: self.pending.clone(),
                    commit_duration: Some(self.metrics.commit_duration()),
                };
                async move {
                    let open = move || Embedded::open(&dir, window, retention, metrics);
                    tokio::task::spawn_blocking(open).await.map_err(|e| OpenError {
                        path: PathBuf::new(),
                        cause: OpenCause::Task(e),
                    })?
                }
            })
            .await
    }

    /// The publish buffer and body deadline.
    pub fn publish_limits(&self) -> &publish::PublishLimits {
        &self.publish
    }

    /// Spans of publishes and deliveries.
    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// Closes the store file cleanly, after the work using it has stopped (the shutdown's
    /// last step): the next start opens it without a repair.
    pub async fn close(&self) {
        if let Some(store) = self.store.get() {
            store.close().await;
        }
    }

    /// The store, if it is open.
    pub fn opened(&self) -> Option<&Embedded> {
        self.store.get()
    }

    /// Why the remote broker cannot hold queue `queue`, if it cannot.
    pub fn refuses(&self, queue: &config::QueueName) -> Option<&'static str> {
        use crate::messaging::broker::Remote;
        self.remote.as_ref()?.refuses(queue)
    }

    /// With a remote broker: starts the relay from the outbox, until `stop`.
    pub fn relay(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let remote = self.remote.clone()?;
        let (wake, status) = (self.relay_wake.clone(), self.relay_status.clone());
        Some(tokio::spawn(relay::run(self.clone(), remote, wake, status, stop)))
    }

    /// With `messaging.app_outbox`: starts relaying the app's table into the outbox, until
    /// `stop`.
    pub fn relay_app_outbox(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (cfg, status) = self.app_outbox.clone()?;
        Some(tokio::spawn(app_outbox::run(self.clone(), cfg, status, stop)))
    }

    /// The app outbox's readiness check: `None` without one; else `Ok(detail)`, or
    /// `Err(detail)` while its database cannot be reached or rows cannot be published.
    pub fn app_outbox_check(&self) -> Option<Result<String, String>> {
        let (cfg, status) = self.app_outbox.as_ref()?;
        Some(status.check(&cfg.table))
    }

    /// Counts rows relayed from the app's outbox table.
    fn app_outbox_relayed(&self, rows: u64) {
        self.app_outbox_relayed.inc_by(rows);
    }

    /// Applies the dead-letter age cap every [`RETENTION_EVERY`] until `stop`, so dead letters
    /// past `max_age` go also from a store nothing is written to (commits sweep as they go).
    pub fn retain(
        self: &Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let messaging = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RETENTION_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                let Some(messaging) = messaging.upgrade() else { return };
                let Some(store) = messaging.store.get() else { continue };
                // each sweep commit drops a bounded few; go on while there are more
                loop {
                    match store.sweep_dead_letters().await {
                        Ok(true) if !*stop.borrow() => {}
                        Ok(_) => break,
                        Err(error) => {
                            tracing::warn!(error = %chain(&error), "dead-letter retention sweep failed");
                            break;
                        }
                    }
                }
            }
        })
    }

    /// The broker's readiness check: `None` for the embedded one (its failures show on each
    /// publish); else `Ok(detail)` or `Err(detail)` while relaying fails.
    pub fn broker_check(&self) -> Option<Result<String, String>> {
        let system = self.remote.as_ref()?.system();
        let pending = self.pending.get();
        Some(match self.relay_status.failing() {
            None => Ok(format!("{system}: relaying; {pending} message(s) in the outbox")),
            Some(error) => Err(format!("{error}; {pending} message(s) wait in the outbox")),
        })
    }

    /// The `app` check as deliveries see it: `None` when nothing delivers; `Err(detail)` while
    /// a subscription is paused because the app refuses connections.
    pub fn app_check(&self) -> Option<Result<String, String>> {
        self.pauses.check()
    }

    /// The queue messages are read from and dead-lettered in: the remote broker, or the
    /// embedded store once it is open (`None` while it never was: nothing is queued yet).
    fn queue(&self) -> Option<AnyQueue> {
        match &self.remote {
            Some(remote) => Some(remote.queue()),
            None => self.store.get().cloned().map(AnyQueue::Embedded),
        }
    }

    /// A page of `dlq`'s dead letters, newest first.
    pub async fn dead_letters(
        &self,
        dlq: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<DeadLetterPage, BrokerError> {
        match self.queue() {
            Some(queue) => queue.dead_letters(dlq, before, limit).await,
            None => Ok(DeadLetterPage { messages: Vec::new(), next: None }),
        }
    }

    pub async fn dead_letter_get(
        &self,
        dlq: &str,
        id: MessageId,
    ) -> Result<Option<Envelope>, BrokerError> {
        match self.queue() {
            Some(queue) => queue.dead_letter_get(dlq, id).await,
            None => Ok(None),
        }
    }

    pub async fn dead_letter_delete(&self, dlq: &str, id: MessageId) -> Result<bool, BrokerError> {
        match self.queue() {
            Some(queue) => queue.dead_letter_delete(dlq, id).await,
            None => Ok(false),
        }
    }

    pub async fn dead_letter_purge(&self, dlq: &str) -> Result<u64, BrokerError> {
        match self.queue() {
            Some(queue) => queue.dead_letter_purge(dlq).await,
            None => Ok(0),
        }
    }

    /// Moves dead letters back to their queues, and wakes the dispatchers.
    pub async fn dead_letter_replay(
        &self,
        dlq: &str,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageId>, BrokerError> {
        let replayed = match self.queue() {
            Some(queue) => queue.dead_letter_replay(dlq, ids).await?,
            None => Vec::new(),
        };
        for wake in self.wakers.values() {
            wake.notify_one();
        }
        Ok(replayed)
    }

    /// Each queue's depth: every queue of the embedded store; with Redis, each subscribed lane
    /// as this service's group sees it, and its dead-letter queue (the outbox is
    /// `outrigger_outbox_pending`). Empty while the embedded store was never opened.
    pub async fn depths(&self) -> Result<Vec<QueueDepth>, BrokerError> {
        let Some(queue) = self.queue() else { return Ok(Vec::new()) };
        queue.depths(&Lane::all(&self.subscriptions)).await
    }

    /// Starts one dispatcher per subscription, delivering to `app_base` (`service.app.url`
    /// with its base path) while `app_up`; they stop when `stop` turns true, after the
    /// deliveries in flight. Only after [`Messaging::start`], which opened the store.
    pub fn deliver(
        &self,
        service: &str,
        app_base: String,
        app_up: watch::Receiver<bool>,
        stop: watch::Receiver<bool>,
    ) -> JoinSet<()> {
        let mut dispatchers = JoinSet::new();
        if let Some(queue) = self.queue() {
            let ctx = self.delivery_context(queue, service, app_base);
            for sub in &self.subscriptions {
                let wake = self.wakers[sub.queue.as_str()].clone();
                let subscriber = deliver::Subscriber::new(sub, &ctx, wake);
                dispatchers.spawn(subscriber.run(app_up.clone(), stop.clone()));
            }
        }
        dispatchers
    }

    fn delivery_context(
        &self,
        broker: AnyQueue,
        service: &str,
        app_base: String,
    ) -> deliver::Context<AnyQueue> {
        deliver::Context {
            broker,
            service: service.to_owned(),
            app_base,
            dedup_window: self.dedup_window,
            memory: self.store.get().cloned(),
            metrics: self.metrics.clone(),
            tracer: self.tracer.clone(),
            pauses: self.pauses.clone(),
        }
    }

    /// Wakes the dispatcher of `queue`, if it is subscribed: a message was stored.
    fn wake(&self, queue: &str) {
        if self.remote.is_some() {
            // the relay moves it first; the dispatcher's blocking read sees it arrive
            self.relay_wake.notify_one();
        } else if let Some(wake) = self.wakers.get(queue) {
            wake.notify_one();
        }
    }

    /// Counts a stored message of `queue` and wakes its dispatcher. Queue names come from the
    /// app: past [`MAX_QUEUE_SERIES`] distinct queues, the others share one series,
    /// `queue="(other)"`, so a publisher inventing names cannot grow the metrics without end.
    fn stored(&self, queue: &str) {
        let known = self.published.read().unwrap_or_else(|e| e.into_inner()).get(queue).cloned();
        let counter = known.unwrap_or_else(|| {
            let mut all = self.published.write().unwrap_or_else(|e| e.into_inner());
            if all.len() >= MAX_QUEUE_SERIES && !all.contains_key(queue) {
                let other = all.entry(OTHER_QUEUES.into()).or_insert_with(|| {
                    tracing::warn!(queue, cap = MAX_QUEUE_SERIES, "more queues than the metrics give series to; the rest are counted as queue=\"(other)\"");
                    self.metrics.messages_published(OTHER_QUEUES)
                });
                return other.clone();
            }
            all.entry(queue.into())
                .or_insert_with(|| self.metrics.messages_published(queue))
                .clone()
        });
        counter.inc();
        self.wake(queue);
    }
}
