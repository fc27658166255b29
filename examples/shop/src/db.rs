//! Each service's database: created and migrated by `shop setup`, and reached through a pool
//! of a fixed size per instance, so the connections of every instance of every service add up
//! to a number known in advance (docs/shop.md shows the sum against `max_connections`).

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Connection;

use crate::settings::Settings;
use crate::Service;

/// How long a request waits for a connection before it is answered 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// The migrations of a service, built into the binary.
fn migrator(service: Service) -> sqlx::migrate::Migrator {
    match service {
        Service::Users => sqlx::migrate!("migrations/users"),
        Service::Catalog => sqlx::migrate!("migrations/catalog"),
        Service::Orders => sqlx::migrate!("migrations/orders"),
        Service::Payments => sqlx::migrate!("migrations/payments"),
        Service::Provider => sqlx::migrate!("migrations/provider"),
        Service::Notifications => sqlx::migrate!("migrations/notifications"),
        Service::Relay => migrator(Service::Orders),
    }
}

/// The service's pool. It opens its connections in the background and keeps them all open,
/// so an instance never holds more than `db_connections`, nor, once warm, fewer; a database
/// that is down at start only makes the health check fail until it is back.
pub fn pool(settings: &Settings, service: Service) -> Result<PgPool, String> {
    PgPoolOptions::new()
        .max_connections(settings.db_connections)
        .min_connections(settings.db_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy(&settings.database_url(service))
        .map_err(|err| format!("SHOP_POSTGRES: {err}"))
}

/// Opens every connection of the pool now (the pool itself opens one at a time, as requests
/// need them), retrying while the database is away, so an instance holds its whole share from
/// the start: the steady state is the worst case, and the first requests wait for no handshake.
pub async fn warm(pool: PgPool, connections: u32) {
    loop {
        let opened = futures_util::future::join_all((0..connections).map(|_| pool.acquire())).await;
        if opened.iter().all(Result::is_ok) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `shop setup`: every database, created if missing and migrated; the admin token file.
pub async fn setup(settings: &Settings) -> Result<(), String> {
    let server = format!("{}/postgres", settings.postgres.trim_end_matches('/'));
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .map_err(|err| format!("cannot reach PostgreSQL at {} (SHOP_POSTGRES): {err}", settings.postgres))?;
    for service in Service::ALL {
        let name = settings.database(service);
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(format!("SHOP_DATABASE_PREFIX gives the database name {name:?}: use a-z, 0-9 and _"));
        }
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(|err| err.to_string())?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await
                .map_err(|err| format!("cannot create the database {name}: {err}"))?;
            tracing::info!("created the database {name}");
        }
        let mut connection = sqlx::PgConnection::connect(&settings.database_url(service))
            .await
            .map_err(|err| format!("cannot reach the database {name}: {err}"))?;
        migrator(service)
            .run(&mut connection)
            .await
            .map_err(|err| format!("migrating the database {name}: {err}"))?;
        tracing::info!("{name}: migrated");
    }
    if let Some(path) = &settings.admin_token_file {
        write_token(path)?;
    }
    Ok(())
}

/// A random token for the admin API, readable by its owner only; one already there stays.
fn write_token(path: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| std::io::Read::read_exact(&mut urandom, &mut random))
        .map_err(|err| format!("cannot read /dev/urandom: {err}"))?;
    let token: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(token.as_bytes()))
        .map_err(|err| {
            format!("cannot write the admin token to {} (SHOP_ADMIN_TOKEN_FILE): {err}", path.display())
        })?;
    tracing::info!("wrote the admin token to {}", path.display());
    Ok(())
}

/// Whether the database answers, within a second: the instance's readiness.
pub async fn ready(pool: &PgPool) -> bool {
    let check = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
    matches!(tokio::time::timeout(Duration::from_secs(1), check).await, Ok(Ok(1)))
}
