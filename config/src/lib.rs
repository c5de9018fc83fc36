//! Outrigger's configuration: the YAML model (DESIGN.md, "Configuration"), its defaults, and
//! loading that reports every problem of a file at once as `FILE:LINE:COL: path: message`.
//! Parsing is saphyr-parser into a positioned tree, then serde over that tree (`yaml`), then
//! the cross-field rules (`validate`); a `Config` that loads is valid throughout.
#![forbid(unsafe_code)]

mod error;
mod grpc;
mod load;
mod model;
mod types;
mod validate;
mod yaml;

pub use error::{LoadError, Problem, Problems};
pub use grpc::GrpcStatus;
pub use load::{load_endpoints_str, load_file, load_str};
pub use model::*;
pub use types::{
    AppUrl, Broker, ByteSize, Duration, Endpoint, ListenAddr, NameServer, NatsUrl, Percent,
    PostgresUrl, QueueName, Ratio, RedisClusterUrl, RedisUrl, TableName, UpstreamName, ValueError,
};
