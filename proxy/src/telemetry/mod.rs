//! What operators see: Prometheus metrics, logs and traces.

pub mod grpc;
pub mod log;
pub mod metrics;
pub(crate) mod otlp;
pub mod trace;
