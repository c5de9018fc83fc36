//! Outrigger: a per-service sidecar resilience proxy.
//!
//! Start at `stack.rs` (the request path on one screen) and `app.rs` (config -> listeners).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod check;
pub mod cli;
pub mod demo;
pub mod error;
pub mod explain;
#[doc(hidden)]
pub mod fuzz;
pub mod http;
pub mod messaging;
pub mod policy;
pub mod reload;
pub mod stack;
pub mod telemetry;

pub use outrigger_config as config;
