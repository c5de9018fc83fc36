//! The admin listener: probes for the orchestrator, metrics for Prometheus, and control
//! endpoints for the operator on the same host.

pub mod circuit;
pub mod dlq;
pub mod health;
pub mod server;

pub use circuit::Circuits;
pub use health::Health;
pub use server::Admin;
