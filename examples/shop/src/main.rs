//! `shop`: the reference shop's services and their one-time setup, in one binary. Surge runs
//! each service as a pool of `shop serve SERVICE` instances (docs/shop.md):
//!
//! - `shop setup`: create each service's database (if missing), run its migrations, and write
//!   the admin token the catalog purges the gateway's cache with;
//! - `shop serve users|catalog|orders|payments|provider|notifications`: one instance, on `$PORT`;
//! - `shop seed`: generate users, products and orders for benchmarks and the index tests;
//! - `shop rebuild-read-model`: make the orders' read model again from their events.
//!
//! Settings come from the environment, so one surge.toml sets them for every instance:
//! `SHOP_POSTGRES` (server URL), `SHOP_DATABASE_PREFIX` (`shop_`), `SHOP_DB_CONNECTIONS`,
//! `SHOP_REDIS`, `SHOP_CACHE` (`off` turns the cache-aside off), `SHOP_GATEWAY`, `SHOP_ADMIN_URL`, `SHOP_ADMIN_TOKEN_FILE`.

mod analytics;
mod app;
mod aside;
mod catalog;
mod checkout;
mod client;
mod db;
mod events;
mod notifications;
mod orders;
mod payments;
mod provider;
mod relay;
mod saga;
mod seed;
mod settings;
mod users;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use settings::Settings;

#[derive(Parser)]
#[command(name = "shop", version, about = "The reference shop's services, run by Surge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the databases (if missing), run every service's migrations, and write the admin
    /// token file (if missing)
    Setup,
    /// Serve one service on $PORT
    Serve { service: Service },
    /// Make the orders' read model again from their events
    RebuildReadModel,
    /// Fill the databases with generated users, products and orders
    Seed {
        #[arg(long, default_value_t = 100_000)]
        users: i64,
        #[arg(long, default_value_t = 10_000)]
        products: i64,
        #[arg(long, default_value_t = 1_000_000)]
        orders: i64,
    },
}

/// The shop's services; each owns the database named after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    Users,
    Catalog,
    Orders,
    Payments,
    /// The card processor stand-in.
    Provider,
    Notifications,
    /// Publishes the orders database's outbox to Surge's queues.
    Relay,
}

impl Service {
    /// The services that own a database.
    pub const ALL: [Service; 6] = [
        Service::Users,
        Service::Catalog,
        Service::Orders,
        Service::Payments,
        Service::Provider,
        Service::Notifications,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Users => "users",
            Service::Catalog => "catalog",
            Service::Orders => "orders",
            Service::Payments => "payments",
            Service::Provider => "provider",
            Service::Notifications => "notifications",
            Service::Relay => "relay",
        }
    }

    /// The service whose database this one uses: its own, but for the relay (the orders').
    pub fn owner(self) -> Service {
        match self {
            Service::Relay => Service::Orders,
            owner => owner,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(false).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let settings = Settings::from_env()?;
        match cli.command {
            Command::Setup => db::setup(&settings).await,
            Command::Serve { service } => app::serve(service, &settings).await,
            Command::Seed { users, products, orders } => seed::run(&settings, users, products, orders).await,
            Command::RebuildReadModel => {
                let pool = db::pool(&settings, Service::Orders)?;
                let orders = events::rebuild(&pool).await.map_err(|err| err.to_string())?;
                tracing::info!("order_summaries made again from the events of {orders} orders");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
