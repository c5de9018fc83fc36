//! End-to-end tests: the real `outrigger` binary against real servers on loopback.
//! One test binary, so the harness compiles and links once.

mod admin;
mod cli;
mod malformed;
mod policies;
mod proxy;
mod tls;
