//! Outrigger configuration (being written).
#![forbid(unsafe_code)]
