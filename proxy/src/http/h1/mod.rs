//! Our own HTTP/1.1 codec (issue 20). The server (`server.rs`) takes the app's requests, each
//! head checked and parsed once by the framing guard's rules, and leaves what it does not do
//! (HTTP/2, upgrades, `Expect`, slow or refused heads) to hyper behind the guard. The client
//! (`exchange.rs`) sends HTTP/1 requests to plain upstreams: a request head written in one
//! buffer, bodies streamed by their framing, the response head parsed with httparse, idle
//! connections kept on their endpoint; hyper still carries HTTP/2, TLS upstreams, upgrades and
//! gRPC. One chunked reader (`chunked.rs`) serves the guard, the server and the client.

pub(crate) mod buf;
pub(crate) mod chunked;
mod encode;
mod exchange;
pub(crate) mod incoming;
pub(crate) mod pool;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod server;

pub use exchange::ResponseBody;
pub(crate) use exchange::{Client, Exchange, ExchangeError};
pub use incoming::RequestBody;
