//! Logs through `tracing`, as text or JSON per `telemetry.log`.
//!
//! `OUTRIGGER_LOG` (an env-filter directive such as `debug` or `info,outrigger_proxy=trace`)
//! overrides the configured level, for debugging a running deployment without editing its YAML.

use outrigger_config as config;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; later calls (tests, the demo) keep the first one.
pub fn init(cfg: &config::Log) {
    let filter = std::env::var("OUTRIGGER_LOG")
        .ok()
        .and_then(|directive| EnvFilter::try_new(directive).ok())
        .unwrap_or_else(|| {
            EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"))
        });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
