//! Our own HTTP/1.1 client for plain upstreams (issue 20): a request head written in one
//! buffer, bodies streamed by their framing, the response head parsed in place with httparse,
//! and idle connections kept on their endpoint. hyper still carries HTTP/2, TLS upstreams,
//! upgrades and gRPC. The chunked reader is shared with the framing guard, so the client and the
//! front door read chunked bodies by one set of rules.

pub(crate) mod chunked;
mod exchange;
pub(crate) mod pool;
pub(crate) mod request;
pub(crate) mod response;

pub use exchange::ResponseBody;
pub(crate) use exchange::{Client, Exchange, ExchangeError};
