//! The `surge` command line. It only wires the crates together: configuration, pools,
//! gateway and admin API.
#![allow(clippy::print_stdout)]

mod admin_client;
mod check;
mod control;
mod load;
mod reload;
mod sim;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// jemalloc, for its per-thread caches: a proxied request's larger allocations (its exchange's
/// and its try's futures, over a kilobyte each) took glibc's slow path. 40,814 -> 38,621
/// instructions per request (bench/proxy/callgrind.py), with the same resident memory holding
/// 10,000 idle connections (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "surge",
    version,
    about = "Runs stateless services as pools of instances behind a gateway, and scales them with load",
    after_help = "Start with `surge check` on your surge.toml, then `surge up`. Documentation: docs/config.md"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every service of the configuration and serve until SIGINT or SIGTERM
    Up(ConfigArg),
    /// Validate the configuration (keys, values, routes, commands, ports) and summarise it
    Check(ConfigArg),
    /// Show the services and instances of a running surge
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON of the admin API instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Set the number of instances a service runs (within its min and max)
    Scale {
        /// The service, as named in [services.NAME]
        service: String,
        /// The desired number of instances
        instances: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop one instance gracefully (its requests finish first); the pool starts another in its
    /// place
    Drain {
        /// The service, as named in [services.NAME] or [workers.NAME]
        service: String,
        /// The instance, as `surge status` lists it (`web-3`)
        instance: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the address of the live dashboard of a running surge, with the admin token
    Dashboard {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make a running surge read its configuration again and apply it without dropping requests
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the queues of a running surge (depth, in flight, dead letters), or act on their
    /// dead letters
    #[command(after_help = "Examples:\n  surge queues\n  surge queues dead emails\n  \
        surge queues redrive emails\n  surge queues redrive emails --id 0000018c2f1a4000\n  \
        surge queues repair emails")]
    Queues {
        #[command(subcommand)]
        action: Option<QueueAction>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Load-test an HTTP service: open loop at a rate or shape, or closed loop
    #[command(after_help = "Examples:\n  surge load http://127.0.0.1:8080/ --rate 500/s --duration 30s\n  \
        surge load -s scenario.toml --json report.json --plot report.svg\n  \
        surge load http://127.0.0.1:8080/ --closed --connections 64 --duration 10s\n\n\
        Scenario files: docs/load.md")]
    Load(load::LoadArgs),
    /// Simulate Surge's autoscaler against HPA, Knative, KEDA and AWS in virtual time
    #[command(after_help = "Examples:\n  surge sim\n  surge sim --scenario step --plot step.svg\n  \
        surge sim --trace data/traces/azure-llm-2023-code.csv --scale 20")]
    Sim(sim::SimArgs),
}

#[derive(Subcommand)]
enum QueueAction {
    /// List a queue's dead letters, with their last errors
    Dead {
        /// The queue, as named in [queues.NAME]
        queue: String,
    },
    /// Put dead letters back in their queue, attempts cleared: all of them, or those given
    Redrive {
        queue: String,
        /// A message id (repeat for several); without it, every dead letter
        #[arg(long = "id")]
        ids: Vec<String>,
    },
    /// Drop dead letters for good: all of them, or those given
    Purge {
        queue: String,
        #[arg(long = "id")]
        ids: Vec<String>,
    },
    /// Rewrite an embedded queue's damaged log files with every intact record (surge stopped;
    /// each file as it was is kept beside it as .damaged)
    Repair { queue: String },
}

#[derive(Args)]
struct ConfigArg {
    /// The configuration file
    #[arg(short, long, default_value = "surge.toml")]
    config: PathBuf,
}

#[derive(Args)]
struct AdminArgs {
    /// The admin API of the running surge (host:port); by default the [admin] listen address
    /// of the configuration file, else 127.0.0.1:9900
    #[arg(long, env = "SURGE_ADMIN", global = true)]
    admin: Option<String>,
    /// The configuration file to take the admin address from
    #[arg(short, long, default_value = "surge.toml", global = true)]
    config: PathBuf,
}

/// Why a command failed, reported once at the top.
enum Failure {
    /// Configuration errors print themselves, each with its file, line and key.
    Config(surge_config::ConfigErrors),
    Message(String),
}

impl From<surge_config::ConfigErrors> for Failure {
    fn from(errors: surge_config::ConfigErrors) -> Self {
        Failure::Config(errors)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Message(message)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(&args.config),
        Command::Check(args) => check::run(&args.config),
        Command::Status { admin, json } => control::status(&admin, json),
        Command::Scale { service, instances, admin } => control::scale(&admin, &service, instances),
        Command::Drain { service, instance, admin } => control::drain(&admin, &service, &instance),
        Command::Dashboard { admin } => control::dashboard(&admin),
        Command::Reload { admin } => control::reload(&admin),
        Command::Queues { action, admin } => control::queues(&admin, action),
        Command::Load(args) => load::run(args),
        Command::Sim(args) => sim::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(errors)) => {
            eprint!("{errors}");
            let count = errors.0.len();
            eprintln!("surge: {count} configuration error{}", if count == 1 { "" } else { "s" });
            ExitCode::FAILURE
        }
        Err(Failure::Message(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
