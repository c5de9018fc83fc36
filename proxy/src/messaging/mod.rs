//! Messaging (DESIGN.md "Messaging"): the app publishes to `POST /v1/publish/{queue}` on the
//! outbound listener, and the message is durable in the store before it gets its 202.
//!
//! The store (the `embedded` broker, a redb file in `messaging.data_dir`) opens at startup when
//! its file already exists, so a restarted sidecar reports what it still holds; otherwise at the
//! first publish, so a sidecar that never publishes never writes to disk; with subscriptions,
//! at startup. [`deliver`] runs one dispatcher per subscription; a publish wakes its queue's.

pub mod broker;
pub mod deliver;
pub mod envelope;
pub mod publish;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outrigger_config as config;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::JoinSet;

use crate::messaging::broker::embedded::{self, Embedded, OpenError, QueueDepth};
use crate::telemetry::metrics::Metrics;

/// The sidecar's messaging: its store, opened once, and its metrics.
#[derive(Debug)]
pub struct Messaging {
    data_dir: PathBuf,
    dedup_window: Duration,
    store: OnceCell<Embedded>,
    metrics: Metrics,
    pending: IntGauge,
    /// `outrigger_messages_published_total{queue}` handles, made at a queue's first message.
    published: RwLock<HashMap<Box<str>, IntCounter>>,
    /// Each subscribed queue's dispatcher wake-up, notified by a publish to it.
    wakers: HashMap<Box<str>, Arc<Notify>>,
    subscriptions: Vec<config::Subscription>,
}

impl Messaging {
    /// Messaging as configured; opens the store now if `data_dir` already holds one.
    pub async fn start(cfg: &config::Messaging, metrics: &Metrics) -> Result<Arc<Self>, OpenError> {
        let messaging = Arc::new(Messaging {
            data_dir: cfg.data_dir.clone(),
            dedup_window: cfg.dedup_window.get(),
            store: OnceCell::new(),
            metrics: metrics.clone(),
            pending: metrics.outbox_pending(),
            published: RwLock::new(HashMap::new()),
            wakers: cfg
                .subscriptions
                .iter()
                .map(|s| (Box::from(s.queue.as_str()), Arc::new(Notify::new())))
                .collect(),
            subscriptions: cfg.subscriptions.clone(),
        });
        if !cfg.subscriptions.is_empty() || cfg.data_dir.join(embedded::FILE_NAME).exists() {
            messaging.store().await?;
        }
        Ok(messaging)
    }

    /// The store, opened on first use (in a blocking task: opening may repair the file).
    pub async fn store(&self) -> Result<&Embedded, OpenError> {
        self.store
            .get_or_try_init(|| {
                let (dir, window, pending) =
                    (self.data_dir.clone(), self.dedup_window, self.pending.clone());
                async move {
                    tokio::task::spawn_blocking(move || Embedded::open(&dir, window, pending))
                        .await
                        .map_err(|e| OpenError { path: PathBuf::new(), reason: e.to_string() })?
                }
            })
            .await
    }

    /// Each queue's depth; empty while the store is not open (nothing was ever published).
    pub async fn depths(&self) -> Result<Vec<QueueDepth>, broker::BrokerError> {
        match self.store.get() {
            Some(store) => store.depths().await,
            None => Ok(Vec::new()),
        }
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
        let Some(store) = self.store.get() else { return dispatchers };
        let ctx = deliver::Context {
            broker: store.clone(),
            service: service.to_owned(),
            app_base,
            dedup_window: self.dedup_window,
            metrics: self.metrics.clone(),
        };
        for sub in &self.subscriptions {
            let wake = self.wakers[sub.queue.as_str()].clone();
            let subscriber = deliver::Subscriber::new(sub, &ctx, wake);
            dispatchers.spawn(subscriber.run(app_up.clone(), stop.clone()));
        }
        dispatchers
    }

    /// Wakes the dispatcher of `queue`, if it is subscribed: a message was stored.
    fn wake(&self, queue: &str) {
        if let Some(wake) = self.wakers.get(queue) {
            wake.notify_one();
        }
    }

    /// Counts a stored message of `queue` and wakes its dispatcher.
    fn stored(&self, queue: &str) {
        let known = self.published.read().unwrap_or_else(|e| e.into_inner()).get(queue).cloned();
        let counter = known.unwrap_or_else(|| {
            let mut all = self.published.write().unwrap_or_else(|e| e.into_inner());
            all.entry(queue.into())
                .or_insert_with(|| self.metrics.messages_published(queue))
                .clone()
        });
        counter.inc();
        self.wake(queue);
    }
}
