//! The `outrigger` command line: parse, load config, run, and turn errors into exit codes.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrigger_proxy::{app, config, demo, telemetry};

#[derive(Debug, Parser)]
#[command(name = "outrigger", version, about = "A per-service sidecar resilience proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// The YAML configuration file.
        #[arg(long, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file: prints `ok`, or every problem as FILE:LINE:COL: path: what.
    Validate {
        #[arg(long, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
    },
    /// Watch the policies act on local scripted upstreams (nothing to install).
    Demo {
        /// How long to drive traffic, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match config::load_file(&config) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(err) => {
                println!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let config = match config::load_file(&config) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("{err}");
                    eprintln!("outrigger: not starting: the configuration is invalid");
                    return ExitCode::FAILURE;
                }
            };
            telemetry::log::init(&config.telemetry.log);
            match runtime().block_on(app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "outrigger could not start");
                    eprintln!("outrigger: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { seconds } => {
            match runtime().block_on(demo::run(std::time::Duration::from_secs(seconds))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("outrigger demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}
