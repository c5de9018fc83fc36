//! The outbound data plane: accept, guard, route, forward, and answer for ourselves.

pub mod body;
pub(crate) mod connect;
pub mod forward;
pub mod grpc;
pub(crate) mod guard;
pub mod h1;
pub(crate) mod idle;
pub mod in_flight;
pub mod listener;
pub mod probe;
pub mod respond;
pub mod route;
pub mod route_match;
pub mod tee;
pub mod tls;

pub use body::Body;
