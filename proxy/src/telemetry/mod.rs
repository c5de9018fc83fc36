//! What operators see: Prometheus metrics and logs.

pub mod log;
pub mod metrics;
