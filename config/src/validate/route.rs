//! The rules of an upstream's routes: a unique name, a match that can match, and only the
//! per-call sections (the endpoint-level ones stay on the upstream).

use super::Checks;
use crate::model::{DEFAULT_ROUTE, Route, RouteRetry, Upstream};

/// What a route may set, for the line refusing an endpoint-level section.
const ROUTE_SECTIONS: &str = "a section a route may set: idempotent, timeouts, retry, \
    rate_limit, concurrency_limit, hedge, fault; this one is the upstream's";

impl Checks {
    pub(super) fn routes(&mut self, path: &str, upstream: &Upstream) {
        for (i, route) in upstream.routes.iter().enumerate() {
            let at = format!("{path}.routes[{i}]");
            self.route(&at, route, upstream);
            let earlier = upstream.routes[..i].iter().position(|r| r.name == route.name);
            if let Some(first) = earlier {
                let message = format!("{:?} is already the name of routes[{first}]", route.name);
                self.push(format!("{at}.name"), message, Some("a name unique within the upstream"))
                    .reading(format!("{path}.routes[{first}].name"));
            }
        }
    }

    fn route(&mut self, at: &str, route: &Route, upstream: &Upstream) {
        if route.name.trim().is_empty() {
            self.push(format!("{at}.name"), "must not be empty", Some("e.g. charge"));
        } else if route.name == DEFAULT_ROUTE {
            let message = "is the label of requests no route matched";
            self.push(format!("{at}.name"), message, Some("another name"));
        }
        for field in route.upstream_only_fields() {
            self.push(format!("{at}.{field}"), "not allowed on a route", Some(ROUTE_SECTIONS));
        }
        let matches = &route.matches;
        if let Some(path) = &matches.path {
            self.absolute_path(format!("{at}.match.path"), path);
        }
        if let Some(prefix) = &matches.path_prefix {
            self.absolute_path(format!("{at}.match.path_prefix"), prefix);
        }
        if matches.path.is_some() && matches.path_prefix.is_some() {
            let expected = Some("one of path (exact) or path_prefix (whole segments)");
            self.push(format!("{at}.match.path_prefix"), "not allowed beside path", expected);
        }
        for (j, method) in matches.methods.iter().enumerate() {
            let token = |b: u8| b.is_ascii_uppercase() || b"-_".contains(&b);
            if method.is_empty() || !method.bytes().all(token) {
                let message = format!("{method:?} is not an HTTP method");
                let expected = Some("a method in capitals, e.g. GET, POST");
                self.push(format!("{at}.match.methods[{j}]"), message, expected);
            }
        }
        for name in matches.headers.keys() {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                let message = format!("{name:?} is not a header name");
                let expected = Some("a header name such as x-tenant");
                self.push(format!("{at}.match.headers"), message, expected);
            }
        }
        if let Some(timeouts) = &route.timeouts {
            self.positive(format!("{at}.timeouts.request"), timeouts.request);
            if let Some(per_try) = timeouts.per_try {
                self.positive(format!("{at}.timeouts.per_try"), per_try);
                if per_try > timeouts.request {
                    let expected = format!("at most {}, got {per_try}", timeouts.request);
                    self.push(
                        format!("{at}.timeouts.per_try"),
                        "must not exceed timeouts.request",
                        Some(&expected),
                    )
                    .reading(format!("{at}.timeouts.request"));
                }
            }
        }
        if let Some(RouteRetry::On(retry)) = &route.retry {
            self.backoff(&format!("{at}.retry.backoff"), &retry.backoff);
        }
        if let Some(hedge) = &route.hedge {
            // the retry layer holds the budget and the replay buffer a hedge draws on
            let retry = match &route.retry {
                Some(RouteRetry::On(_)) => true,
                Some(RouteRetry::Off) => false,
                None => upstream.retry.is_some(),
            };
            self.hedge(&format!("{at}.hedge"), hedge, retry);
        }
        if let Some(fault) = &route.fault {
            self.fault(&format!("{at}.fault"), fault);
        }
    }
}
