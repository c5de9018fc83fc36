//! The `outrigger` command line: parse, load config, run, and turn errors into exit codes.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrigger_proxy::{app, cli as dlq_cli, config, demo, telemetry};

#[derive(Debug, Parser)]
#[command(name = "outrigger", version, about = "A per-service sidecar resilience proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CircuitAction {
    Open,
    Close,
    Auto,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        /// The YAML configuration file.
        #[arg(long, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
        /// Exit (draining, status 0) once the app's health path stops answering after it was
        /// up: for Kubernetes Jobs, whose pod ends when its containers do.
        #[arg(long)]
        exit_with_app: bool,
    },
    /// Check a configuration file: prints `ok`, or every problem as FILE:LINE:COL: path: what.
    Validate {
        #[arg(long, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
    },
    /// Check what a sidecar would depend on: the config, each upstream's discovery and
    /// endpoints, the registry, the broker, the app, the collector; or, with --admin, what a
    /// running sidecar says of itself. Exit 1 if any check fails.
    Check {
        /// The YAML configuration file to check.
        #[arg(long, env = "OUTRIGGER_CONFIG", conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// A running sidecar's admin endpoint, e.g. http://127.0.0.1:9901.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Force an upstream's circuit breaker open or closed in a running sidecar, or give it back
    /// to its policy (its admin port, on loopback).
    Circuit {
        /// `open`: refuse every request (503 circuit-open); `close`: never open; `auto`: back to
        /// the policy, closed.
        #[arg(value_enum)]
        action: CircuitAction,
        /// The upstream, as named in the config.
        upstream: String,
        /// The sidecar's admin endpoint.
        #[arg(long, env = "OUTRIGGER_ADMIN", default_value = "http://127.0.0.1:9901")]
        admin: String,
    },
    /// Show what an upstream's (or route's) policies do to a sequence of answers, in virtual
    /// time: each attempt, what the client got, the breaker's state.
    Explain {
        /// The YAML configuration file.
        #[arg(long, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
        /// The upstream, as named in the config.
        upstream: String,
        /// One of its routes (default: the upstream's own policies).
        route: Option<String>,
        /// The endpoint's answers in order: STATUS, STATUS@DELAY (200@3s), reset, refused; the
        /// last repeats.
        #[arg(long)]
        answers: String,
        /// How many requests to send.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Between two requests' starts, e.g. 100ms.
        #[arg(long, default_value = "0s")]
        every: config::Duration,
        /// Draw the backoff's jitter from this seed: the same seed, the same timeline.
        #[arg(long)]
        seed: Option<u64>,
        /// The timeline as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Watch the policies act on local scripted upstreams (nothing to install).
    Demo {
        /// How long to drive traffic, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// See, replay and purge dead letters of a running sidecar (its admin port, on loopback).
    Dlq {
        /// The sidecar's admin endpoint.
        #[arg(
            long,
            env = "OUTRIGGER_ADMIN",
            default_value = "http://127.0.0.1:9901",
            global = true
        )]
        admin: String,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Dead letters of a dead-letter queue (e.g. orders_deadletter), newest first.
    List {
        queue: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show those older than this id (the `--before` a page ends with).
        #[arg(long)]
        before: Option<String>,
    },
    /// One dead letter with its whole error history.
    Show { queue: String, id: String },
    /// Move dead letters back to the queue they came from (error history kept).
    Replay {
        queue: String,
        /// These dead letters.
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        /// This id (repeatable; the same as naming it after the queue).
        #[arg(long = "id", value_name = "ID")]
        id_options: Vec<String>,
        /// Every dead letter of the queue.
        #[arg(long)]
        all: bool,
        /// Those whose last error has this status.
        #[arg(long)]
        status: Option<u16>,
        /// Those whose last error's message contains this text.
        #[arg(long)]
        contains: Option<String>,
    },
    /// Remove one dead letter.
    Delete { queue: String, id: String },
    /// Remove these dead letters, or with --all every dead letter of the queue.
    Purge {
        queue: String,
        /// These dead letters.
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        /// Every dead letter of the queue.
        #[arg(long)]
        all: bool,
        /// The same as --all (its earlier spelling).
        #[arg(long)]
        yes: bool,
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
        Command::Run { config: path, exit_with_app } => {
            let config = match config::load_file(&path) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("{err}");
                    eprintln!("outrigger: not starting: the configuration is invalid");
                    return ExitCode::FAILURE;
                }
            };
            telemetry::log::init(&config.telemetry.log);
            if exit_with_app
                && config.service.app.as_ref().and_then(|a| a.health_path.as_ref()).is_none()
            {
                eprintln!("outrigger: --exit-with-app needs service.app.health_path to watch");
                return ExitCode::FAILURE;
            }
            let runtime = runtime(config.runtime.worker_threads());
            match runtime.block_on(app::run(config, path, exit_with_app)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    // the whole chain: what failed, and why, down to the OS's word
                    let err = outrigger_proxy::error::chain(&err);
                    tracing::error!(error = %err, "outrigger could not start");
                    eprintln!("outrigger: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dlq { admin, json, action } => dlq(&admin, json, action),
        Command::Check { config, admin } => check(config, admin),
        Command::Explain { config: path, upstream, route, answers, repeat, every, seed, json } => {
            let run =
                outrigger_proxy::explain::Run { repeat: repeat.max(1), every: every.get(), seed };
            explain(&path, &upstream, route.as_deref(), &answers, run, json)
        }
        Command::Circuit { action, upstream, admin } => {
            let state = match action {
                CircuitAction::Open => "open",
                CircuitAction::Close => "closed",
                CircuitAction::Auto => "auto",
            };
            match runtime(1).block_on(dlq_cli::circuit(&admin, &upstream, state)) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("outrigger circuit: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { seconds } => {
            match runtime(config::Runtime::default().worker_threads())
                .block_on(demo::run(std::time::Duration::from_secs(seconds)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("outrigger demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn dlq(admin: &str, json: bool, action: DlqAction) -> ExitCode {
    use dlq_cli::DlqCommand;
    let command = match action {
        DlqAction::List { queue, limit, before } => DlqCommand::List { queue, limit, before },
        DlqAction::Show { queue, id } => DlqCommand::Show { queue, id },
        DlqAction::Replay { queue, mut ids, id_options, all, status, contains } => {
            ids.extend(id_options);
            if ids.is_empty() && !all && status.is_none() && contains.is_none() {
                eprintln!(
                    "outrigger dlq replay: say which: ID…, --all, --status N or --contains TEXT"
                );
                return ExitCode::FAILURE;
            }
            DlqCommand::Replay { queue, selection: dlq_cli::selection(ids, all, status, contains) }
        }
        DlqAction::Delete { queue, id } => DlqCommand::Delete { queue, id },
        DlqAction::Purge { queue, ids, all, yes } => match (ids.is_empty(), all || yes) {
            (true, true) => DlqCommand::Purge { queue },
            (false, false) => DlqCommand::PurgeIds { queue, ids },
            (false, true) => {
                // refused, not taken as --all: a slip must not empty the queue
                eprintln!("outrigger dlq purge: ids do not mix with --all");
                return ExitCode::FAILURE;
            }
            (true, false) => {
                eprintln!(
                    "outrigger dlq purge: say which: ID… to remove those, or --all to remove \
                     every dead letter of {queue}"
                );
                return ExitCode::FAILURE;
            }
        },
    };
    match runtime(1).block_on(dlq_cli::dlq(admin, command, json)) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("outrigger dlq: {err}");
            ExitCode::FAILURE
        }
    }
}

fn explain(
    path: &std::path::Path,
    upstream: &str,
    route: Option<&str>,
    answers: &str,
    run: outrigger_proxy::explain::Run,
    json: bool,
) -> ExitCode {
    use outrigger_proxy::explain;
    let config = match config::load_file(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let timeline = explain::parse_answers(answers)
        .and_then(|answers| explain::explain(&config, upstream, route, answers, run));
    match timeline {
        Ok(events) if json => {
            println!("{}", serde_json::to_string_pretty(&events).expect("serializes"));
            ExitCode::SUCCESS
        }
        Ok(events) => {
            print!("{}", explain::render(&events));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("outrigger explain: {err}");
            ExitCode::FAILURE
        }
    }
}

fn check(config: Option<PathBuf>, admin: Option<String>) -> ExitCode {
    let lines = match (config, admin) {
        (Some(path), _) => runtime(1).block_on(outrigger_proxy::check::config_file(&path)),
        (None, Some(admin)) => match runtime(1).block_on(outrigger_proxy::check::admin(&admin)) {
            Ok(lines) => lines,
            Err(error) => {
                eprintln!("outrigger check: {error}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => {
            eprintln!("outrigger check: say what to check: --config FILE, or --admin URL");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", outrigger_proxy::check::render(&lines));
    match lines.iter().all(|line| line.ok) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    }
}

/// A runtime of `workers` threads; with one, a single-threaded runtime (no work stealing, no
/// cross-thread wakeups: the cheapest per request, and what a sidecar limited to one CPU gets).
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder.enable_all().build().expect("the tokio runtime starts")
}
