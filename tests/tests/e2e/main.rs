//! End-to-end tests: the real `outrigger` binary against real servers on loopback.
//! One test binary, so the harness compiles and links once.

mod admin;
mod app_outbox;
mod balance;
mod brokers;
mod check;
mod circuit_control;
mod cli;
mod deadlines;
mod delivery;
mod deploy;
mod dlq;
mod dns;
mod explain;
mod fault_injection;
mod faults;
mod front_door;
mod grpc;
mod h1_server;
mod hedging;
mod malformed;
mod messaging;
mod nats;
mod overload;
mod policies;
mod proxy;
mod publish;
mod redis;
mod registry;
mod reload;
mod routes;
mod shadow;
mod soak;
mod tls;
mod tracing;
mod upstream_framing;
