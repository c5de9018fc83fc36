//! Which route of an upstream does a request take? The first whose `match` fits it (path exact
//! or by whole segments, method, headers); none: the upstream's own sections, `(default)`.
//! Chosen once per request, before any policy, from matchers compiled when the stack is built:
//! matching compares bytes and allocates nothing (DESIGN.md, "Routes").

use std::sync::Arc;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use outrigger_config as config;

/// One route's `match`, compiled.
#[derive(Debug, Clone)]
pub struct Matcher {
    path: PathRule,
    /// The standard methods listed, one bit each ([`method_bit`]); with `other_methods`
    /// empty too: any method.
    methods: u16,
    other_methods: Box<[Method]>,
    headers: Box<[HeaderRule]>,
}

/// `name` must be sent with `value`. `slot`: where a walk keeps the name's values once looked
/// up, shared by every route of a table that tests the same name ([`Routed::new`] numbers the
/// first [`SLOTS`] names); [`UNCACHED`] for a name looked up each time.
#[derive(Debug, Clone)]
struct HeaderRule {
    slot: u8,
    name: HeaderName,
    value: HeaderValue,
}

/// How many distinct header names one walk remembers the values of.
const SLOTS: usize = 8;
const UNCACHED: u8 = u8::MAX;

#[derive(Debug, Clone)]
enum PathRule {
    Any,
    Exact(Box<[u8]>),
    /// Without its trailing `/`: a path matches when it equals it or goes on with `/`.
    Segments(Box<[u8]>),
}

/// What routes test of one request, read once for the whole walk down the table.
struct Facts<'r> {
    method: &'r Method,
    method_bit: u16,
    path: &'r [u8],
    headers: &'r HeaderMap,
    /// The values of the header names routes test, by slot, looked up when first needed:
    /// routes mostly test the same few headers, so a walk looks each up once.
    seen: [Option<Sent<'r>>; SLOTS],
}

/// A header's values as a request sent them: nearly always none or one, which are compared
/// without walking the map's value list.
#[derive(Clone, Copy)]
enum Sent<'r> {
    None,
    One(&'r [u8]),
    Many(&'r HeaderMap, &'r HeaderName),
}

impl<'r> Sent<'r> {
    fn of(headers: &'r HeaderMap, name: &'r HeaderName) -> Self {
        let values = headers.get_all(name);
        let mut values = values.iter();
        match (values.next(), values.next()) {
            (None, _) => Sent::None,
            (Some(one), None) => Sent::One(one.as_bytes()),
            (Some(_), Some(_)) => Sent::Many(headers, name),
        }
    }

    fn includes(self, value: &[u8]) -> bool {
        match self {
            Sent::None => false,
            Sent::One(sent) => same_bytes(sent, value),
            Sent::Many(headers, name) => {
                headers.get_all(name).iter().any(|sent| same_bytes(sent.as_bytes(), value))
            }
        }
    }
}

/// An upstream's routes, in file order, each with its own stack, and the stack of requests no
/// route matched. `S` is the stack; cloning clones one `Arc`.
#[derive(Debug, Clone)]
pub struct Routed<S> {
    inner: Arc<Table<S>>,
}

#[derive(Debug)]
struct Table<S> {
    routes: Box<[(Matcher, Arc<str>, S)]>,
    /// Per method slot ([`method_slot`]), the routes among the first 64 that admit the method,
    /// one bit each: a request's walk reads only those, still in file order.
    by_method: [u64; METHOD_SLOTS],
    default: S,
}

/// The nine standard methods, then one slot for every other method.
const METHOD_SLOTS: usize = 10;

/// Routes past this many are read in order after the indexed ones.
const INDEXED: usize = 64;

/// A bit per standard method, 0 for an extension method.
fn method_bit(method: &Method) -> u16 {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD.iter().position(|m| m == method).map_or(0, |i| 1 << i)
}

/// `method_bit` as an index into `Table::by_method`.
fn method_slot(bit: u16) -> usize {
    match bit {
        0 => METHOD_SLOTS - 1,
        bit => bit.trailing_zeros() as usize,
    }
}

// === impl Matcher ===

impl Matcher {
    /// From a validated `match`; a rule that could not be compiled (config validation refuses
    /// those) is left out rather than failing at runtime.
    pub fn new(cfg: &config::RouteMatch) -> Self {
        let bytes = |s: &str| Box::<[u8]>::from(s.as_bytes());
        let path = match (&cfg.path, &cfg.path_prefix) {
            (Some(exact), _) => PathRule::Exact(bytes(exact)),
            (None, Some(prefix)) => PathRule::Segments(bytes(prefix.trim_end_matches('/'))),
            (None, None) => PathRule::Any,
        };
        let listed = cfg.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok());
        let (mut methods, mut other_methods) = (0, Vec::new());
        for method in listed {
            match method_bit(&method) {
                0 => other_methods.push(method),
                bit => methods |= bit,
            }
        }
        let headers = cfg.headers.iter().filter_map(|(name, value)| {
            Some(HeaderRule {
                slot: UNCACHED,
                name: HeaderName::from_bytes(name.as_bytes()).ok()?,
                value: HeaderValue::from_str(value).ok()?,
            })
        });
        Matcher { path, methods, other_methods: other_methods.into(), headers: headers.collect() }
    }

    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        self.fits(&mut Facts::of(req))
    }

    /// Whether a method in `slot` may fit (for the other-methods slot: whether one may).
    fn admits(&self, slot: usize) -> bool {
        let any = self.methods == 0 && self.other_methods.is_empty();
        any || match slot {
            slot if slot == METHOD_SLOTS - 1 => !self.other_methods.is_empty(),
            slot => self.methods & (1 << slot) != 0,
        }
    }

    #[inline(always)]
    fn fits<'r>(&'r self, facts: &mut Facts<'r>) -> bool {
        self.may_fit(facts) && (self.headers.is_empty() || self.headers_fit(facts))
    }

    /// The method and path tests: cheap, and where most routes differ.
    #[inline(always)]
    fn may_fit(&self, facts: &Facts<'_>) -> bool {
        let any_method = self.methods == 0 && self.other_methods.is_empty();
        (any_method
            || self.methods & facts.method_bit != 0
            || self.other_methods.contains(facts.method))
            && self.path.matches(facts.path)
    }

    /// Out of line: only routes whose method and path fit get here.
    #[inline(never)]
    fn headers_fit<'r>(&'r self, facts: &mut Facts<'r>) -> bool {
        self.headers.iter().all(|rule| {
            let fetch = || Sent::of(facts.headers, &rule.name);
            let sent = match facts.seen.get_mut(usize::from(rule.slot)) {
                Some(seen) => *seen.get_or_insert_with(fetch),
                None => fetch(),
            };
            sent.includes(rule.value.as_bytes())
        })
    }

    /// Numbers the header names this matcher tests by `names`, adding new ones while there
    /// is room.
    fn number_headers(&mut self, names: &mut Vec<HeaderName>) {
        for rule in &mut self.headers {
            let known = names.iter().position(|name| *name == rule.name);
            rule.slot = match known {
                Some(slot) => slot as u8,
                None if names.len() < SLOTS => {
                    names.push(rule.name.clone());
                    (names.len() - 1) as u8
                }
                None => UNCACHED,
            };
        }
    }
}

impl PathRule {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathRule::Any => true,
            PathRule::Exact(exact) => same_bytes(path, exact),
            PathRule::Segments(prefix) => {
                path.len() >= prefix.len()
                    && same_bytes(&path[..prefix.len()], prefix)
                    && path.get(prefix.len()).is_none_or(|&b| b == b'/')
            }
        }
    }
}

/// `a == b` for the short strings routes compare (paths, header values), eight bytes at a time
/// and inlined: a profile of the 20-route walk spent 41% of its time in calls to libc's
/// `memcmp`, which `==` on slices becomes.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("chunks of 8"));
    if !a8.by_ref().zip(b8.by_ref()).all(|(x, y)| word(x) == word(y)) {
        return false;
    }
    a8.remainder().iter().zip(b8.remainder()).all(|(x, y)| x == y)
}

impl<'r> Facts<'r> {
    fn of<B>(req: &'r Request<B>) -> Self {
        Facts {
            method: req.method(),
            method_bit: method_bit(req.method()),
            path: req.uri().path().as_bytes(),
            headers: req.headers(),
            seen: Default::default(),
        }
    }
}

// === impl Routed ===

impl<S> Routed<S> {
    /// An upstream without routes: every request takes `default`.
    pub fn single(default: S) -> Self {
        Self::new(Vec::new(), default)
    }

    /// `routes` in file order: (match, name, stack).
    pub fn new(mut routes: Vec<(Matcher, Arc<str>, S)>, default: S) -> Self {
        let mut names = Vec::new();
        for (matcher, _, _) in &mut routes {
            matcher.number_headers(&mut names);
        }
        let by_method = std::array::from_fn(|slot| {
            let indexed = routes.iter().take(INDEXED).enumerate();
            indexed.filter(|(_, (m, _, _))| m.admits(slot)).fold(0, |set, (i, _)| set | 1 << i)
        });
        let routes = routes.into_boxed_slice();
        Routed { inner: Arc::new(Table { routes, by_method, default }) }
    }

    /// The first route that fits `req`, by name, and its stack; else `(default)` and the
    /// upstream's own stack.
    pub fn choose<B>(&self, req: &Request<B>) -> (&str, &S) {
        let table = &*self.inner;
        let mut facts = Facts::of(req);
        let mut candidates = table.by_method[method_slot(facts.method_bit)];
        while candidates != 0 {
            let (matcher, name, stack) = &table.routes[candidates.trailing_zeros() as usize];
            if matcher.fits(&mut facts) {
                return (name, stack);
            }
            candidates &= candidates - 1;
        }
        match table.routes.iter().skip(INDEXED).find(|(matcher, _, _)| matcher.fits(&mut facts)) {
            Some((_, name, stack)) => (name, stack),
            None => (config::DEFAULT_ROUTE, &table.default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(yaml: &str) -> Matcher {
        let yaml = format!(
            "upstreams:\n  p:\n    discovery: {{ static: [\"127.0.0.1:9\"] }}\n    routes:\n      - {{ name: r, match: {yaml} }}\n"
        );
        let config = outrigger_config::load_str("t.yaml", &yaml).unwrap();
        Matcher::new(&config.upstreams.0[0].routes[0].matches)
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let texts: [&[u8]; 8] = [
            b"",
            b"a",
            b"/v1",
            b"/v1/orders",
            b"/v1/orderz",
            b"/v1/orders/42",
            b"12345678",
            b"123456789",
        ];
        for a in texts {
            for b in texts {
                assert_eq!(same_bytes(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn path_is_exact_and_ignores_the_query() {
        let m = matcher("{ path: /v1/charge }");
        assert!(m.matches(&req("GET", "/v1/charge", &[])));
        assert!(m.matches(&req("GET", "http://p/v1/charge?x=1", &[])));
        assert!(!m.matches(&req("GET", "/v1/charge/7", &[])));
        assert!(!m.matches(&req("GET", "/v1/charg", &[])));
    }

    #[test]
    fn path_prefix_matches_whole_segments_only() {
        for prefix in ["/v1/charge", "/v1/charge/"] {
            let m = matcher(&format!("{{ path_prefix: \"{prefix}\" }}"));
            assert!(m.matches(&req("GET", "/v1/charge", &[])), "{prefix}");
            assert!(m.matches(&req("GET", "/v1/charge/", &[])), "{prefix}");
            assert!(m.matches(&req("GET", "/v1/charge/7", &[])), "{prefix}");
            assert!(!m.matches(&req("GET", "/v1/charges", &[])), "{prefix}");
            assert!(!m.matches(&req("GET", "/v1", &[])), "{prefix}");
        }
        let root = matcher("{ path_prefix: / }");
        assert!(root.matches(&req("GET", "/", &[])));
        assert!(root.matches(&req("GET", "/anything/at/all", &[])));
    }

    #[test]
    fn methods_are_any_of_the_list() {
        let m = matcher("{ methods: [POST, PUT] }");
        assert!(m.matches(&req("POST", "/", &[])));
        assert!(m.matches(&req("PUT", "/x", &[])));
        assert!(!m.matches(&req("GET", "/", &[])));
        let extension = matcher("{ methods: [PURGE, GET] }");
        assert!(extension.matches(&req("PURGE", "/", &[])));
        assert!(extension.matches(&req("GET", "/", &[])));
        assert!(!extension.matches(&req("POST", "/", &[])));
        assert!(!extension.matches(&req("PURGED", "/", &[])));
    }

    #[test]
    fn headers_must_each_equal_and_names_are_case_insensitive() {
        let m = matcher("{ headers: { X-Tenant: gold, x-region: eu } }");
        assert!(m.matches(&req("GET", "/", &[("x-tenant", "gold"), ("X-REGION", "eu")])));
        assert!(!m.matches(&req("GET", "/", &[("x-tenant", "gold")])), "every header");
        assert!(!m.matches(&req("GET", "/", &[("x-tenant", "Gold"), ("x-region", "eu")])));
        let two = [("x-tenant", "silver"), ("x-tenant", "gold"), ("x-region", "eu")];
        assert!(m.matches(&req("GET", "/", &two)), "any of a repeated header's values");
    }

    #[test]
    fn every_condition_must_hold_and_an_empty_match_takes_everything() {
        let m = matcher("{ path_prefix: /v1, methods: [POST], headers: { x-tenant: gold } }");
        assert!(m.matches(&req("POST", "/v1/a", &[("x-tenant", "gold")])));
        assert!(!m.matches(&req("GET", "/v1/a", &[("x-tenant", "gold")])));
        assert!(!m.matches(&req("POST", "/v2/a", &[("x-tenant", "gold")])));
        assert!(!m.matches(&req("POST", "/v1/a", &[])));
        assert!(matcher("{}").matches(&req("DELETE", "/x", &[])));
    }

    #[test]
    fn the_first_route_that_matches_wins_else_default() {
        let routed = Routed::new(
            vec![
                (matcher("{ path_prefix: /v1 }"), Arc::from("first"), 1),
                (matcher("{ path: /v1/a }"), Arc::from("second"), 2),
            ],
            0,
        );
        assert_eq!(routed.choose(&req("GET", "/v1/a", &[])), ("first", &1));
        assert_eq!(routed.choose(&req("GET", "/v2", &[])), ("(default)", &0));
        assert_eq!(Routed::single(0).choose(&req("GET", "/v1", &[])), ("(default)", &0));
    }

    #[test]
    fn past_the_indexed_routes_the_first_match_still_wins() {
        let mut routes: Vec<_> = (0..70)
            .map(|i| (matcher(&format!("{{ path: /r{i}, methods: [GET] }}")), Arc::from("x"), i))
            .collect();
        routes.push((matcher("{ methods: [PURGE] }"), Arc::from("purge"), 70));
        routes.push((matcher("{}"), Arc::from("any"), 71));
        let routed = Routed::new(routes, -1);
        assert_eq!(routed.choose(&req("GET", "/r3", &[])).1, &3);
        assert_eq!(routed.choose(&req("GET", "/r66", &[])).1, &66);
        assert_eq!(routed.choose(&req("POST", "/r3", &[])).1, &71);
        assert_eq!(routed.choose(&req("PURGE", "/r3", &[])).1, &70);
        assert_eq!(routed.choose(&req("GET", "/r99", &[])).1, &71);
        let few = Routed::new(
            vec![
                (matcher("{ methods: [POST] }"), Arc::from("post"), 1),
                (matcher("{ methods: [PURGE] }"), Arc::from("purge"), 2),
                (matcher("{ path: /a }"), Arc::from("a"), 3),
            ],
            0,
        );
        assert_eq!(few.choose(&req("PURGE", "/a", &[])).0, "purge");
        assert_eq!(few.choose(&req("LINK", "/a", &[])).0, "a");
        assert_eq!(few.choose(&req("GET", "/b", &[])).0, "(default)");
        assert_eq!(few.choose(&req("POST", "/b", &[])).0, "post");
    }

    #[test]
    fn routes_testing_different_headers_in_turn_each_read_their_own() {
        let routed = Routed::new(
            vec![
                (matcher("{ headers: { x-tenant: gold } }"), Arc::from("gold"), 1),
                (matcher("{ headers: { x-region: eu } }"), Arc::from("eu"), 2),
                (matcher("{ headers: { x-tenant: silver, x-region: us } }"), Arc::from("us"), 3),
                (matcher("{ headers: { x-tenant: bronze } }"), Arc::from("bronze"), 4),
            ],
            0,
        );
        let choose = |headers: &[(&str, &str)]| routed.choose(&req("GET", "/", headers)).0;
        assert_eq!(choose(&[("x-tenant", "gold")]), "gold");
        assert_eq!(choose(&[("x-tenant", "silver"), ("x-region", "eu")]), "eu");
        assert_eq!(choose(&[("x-tenant", "silver"), ("x-region", "us")]), "us");
        assert_eq!(choose(&[("x-tenant", "bronze"), ("x-region", "us")]), "bronze");
        assert_eq!(choose(&[("x-region", "ap")]), "(default)");
    }

    #[test]
    fn more_header_names_than_a_walk_remembers_are_each_looked_up() {
        let mut routes: Vec<_> = (0..SLOTS + 3)
            .map(|i| (matcher(&format!("{{ headers: {{ x-h{i}: v }} }}")), Arc::from("x"), i))
            .collect();
        routes.push((matcher("{ headers: { x-h0: w, x-h10: w } }"), Arc::from("both"), 99));
        let routed = Routed::new(routes, 0);
        let choose = |headers: &[(&str, &str)]| *routed.choose(&req("GET", "/", headers)).1;
        assert_eq!(choose(&[("x-h3", "v")]), 3);
        assert_eq!(choose(&[("x-h9", "v")]), 9, "past the slots");
        assert_eq!(choose(&[("x-h10", "v"), ("x-h2", "v")]), 2, "file order");
        assert_eq!(choose(&[("x-h0", "w"), ("x-h10", "w")]), 99);
        assert_eq!(choose(&[("x-h0", "w"), ("x-h10", "v")]), 10);
        assert_eq!(choose(&[("x-h0", "w")]), 0);
    }
}
