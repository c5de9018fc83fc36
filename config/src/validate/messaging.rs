//! The rules of `messaging:`: subscriptions need an app to deliver to, one subscription per
//! queue, and ranges and durations that can be acted on.

use super::Checks;
use crate::model::{Concurrency, Messaging};
use std::collections::HashSet;

/// Why nats:// refuses a queue name: its dots become subject tokens, and NATS refuses an empty one.
const NATS_TOKENS: &str = "starts or ends with '.', or holds '..': with broker nats:// each dot starts a subject token, and NATS refuses an empty token";
const NATS_EXPECTED: &str =
    "a queue name whose dots each sit between two other characters, such as orders.created";

impl Checks {
    pub(super) fn messaging(&mut self, messaging: &Messaging, has_app: bool) {
        self.positive("messaging.claim_idle", messaging.claim_idle);
        self.positive("messaging.dedup_window", messaging.dedup_window);
        self.positive(
            "messaging.dead_letter_retention.max_age",
            messaging.dead_letter_retention.max_age,
        );
        if let Some(tls) = &messaging.tls {
            self.tls("messaging.tls", tls);
            let over_tls = match &messaging.broker {
                crate::types::Broker::Redis(url) => url.tls(),
                crate::types::Broker::Nats(url) => url.tls(),
                _ => false,
            };
            if !over_tls {
                let expected =
                    Some("broker: rediss://HOST:PORT or nats+tls://HOST:PORT, or no tls section");
                let message = "applies to a rediss:// or nats+tls:// broker only";
                self.push("messaging.tls", message, expected);
            }
            if tls.server_name.is_some() {
                let expected = Some("the host of the broker's URL is the name verified");
                self.push("messaging.tls.server_name", "is not used for the broker", expected);
            }
        }
        if let Some(outbox) = &messaging.app_outbox {
            self.positive("messaging.app_outbox.poll", outbox.poll);
            let expected = Some(
                "postgres: postgres://USER@HOST:PORT/DATABASE, or postgres_file: a file holding it",
            );
            match (&outbox.postgres, &outbox.postgres_file) {
                (None, None) => {
                    // unless one was given and refused: that is the problem then
                    let issue = self.push("messaging.app_outbox", "names no database", expected);
                    issue.reading("messaging.app_outbox.postgres");
                    issue.reading("messaging.app_outbox.postgres_file");
                }
                (Some(_), Some(_)) => {
                    let message = "gives both postgres and postgres_file";
                    self.push("messaging.app_outbox.postgres_file", message, expected);
                }
                _ => {}
            }
        }
        if !messaging.subscriptions.is_empty() && !has_app {
            let expected = Some("service.app.url, e.g. http://127.0.0.1:8080");
            self.push("messaging.subscriptions", "need service.app to deliver to", expected)
                .reading("service.app");
        }
        let mut queues = HashSet::new();
        let nats = matches!(messaging.broker, crate::types::Broker::Nats(_));
        for (i, sub) in messaging.subscriptions.iter().enumerate() {
            let path = format!("messaging.subscriptions[{i}]");
            let lanes = sub
                .priority_lanes
                .iter()
                .enumerate()
                .map(|(j, lane)| (format!("{path}.priority_lanes[{j}]"), lane));
            for (field, queue) in lanes.chain([(format!("{path}.queue"), &sub.queue)]) {
                if nats && !queue.is_nats_subject() {
                    self.push(field.clone(), NATS_TOKENS, Some(NATS_EXPECTED));
                }
                if !queues.insert(queue) {
                    let message = format!("queue {:?} is already subscribed above", queue.as_str());
                    self.push(field, message, Some("one subscription per queue"));
                }
            }
            self.absolute_path(format!("{path}.path"), &sub.path);
            self.backoff(&format!("{path}.backoff"), &sub.backoff);
            self.positive(format!("{path}.timeout"), sub.timeout);
            if let Concurrency::Scaled(range) = sub.concurrency {
                let min = format!("{path}.concurrency.min");
                if range.min == 0 {
                    self.push(min, "must be at least 1", Some("a whole number >= 1, got 0"));
                } else if range.min > range.max {
                    let expected = format!("at most {}, got {}", range.max, range.min);
                    self.push(min, "must not exceed concurrency.max", Some(&expected));
                }
            }
            if let Some(throttle) = &sub.throttle {
                self.positive(format!("{path}.throttle.per"), throttle.per);
            }
            if let Some(breaker) = &sub.circuit_breaker {
                self.positive(format!("{path}.circuit_breaker.open_for"), breaker.open_for);
            }
            if sub.ordered && sub.delivery == crate::model::Delivery::AtMostOnce {
                let expected = Some("ordered: true with delivery: at_least_once");
                let message = "cannot keep order with at_most_once (a message is gone before it is delivered)";
                self.push(format!("{path}.ordered"), message, expected);
            }
        }
    }
}
