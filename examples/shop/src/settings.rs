//! The shop's settings, from the environment surge.toml gives each instance. A value that does
//! not parse is an error naming its variable.

use std::path::PathBuf;
use std::time::Duration;

use crate::Service;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The PostgreSQL server, without a database: `postgres://postgres@127.0.0.1:5432`.
    pub postgres: String,
    /// Each service's database is this followed by its name (`shop_users`).
    pub database_prefix: String,
    /// Connections each instance keeps to its database (opened at start, so the worst case is
    /// the steady case); see docs/shop.md for the arithmetic.
    pub db_connections: u32,
    /// The Redis tier of the cache-aside reads; `None`: in-process only.
    pub redis: Option<String>,
    /// Whether profile and product reads go through the cache-aside (`SHOP_CACHE=off`: not).
    pub cache: bool,
    /// Where the other services are reached: Surge's gateway.
    pub gateway: String,
    /// The admin API, for purging the gateway's cache when products change.
    pub admin_url: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    /// How long a call to another service may take.
    pub call_timeout: Duration,
    /// The port this instance listens on (Surge's `PORT`).
    pub port: u16,
}

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
        let parse = |name: &str, default: u64| -> Result<u64, String> {
            match var(name) {
                None => Ok(default),
                Some(value) => {
                    value.trim().parse().map_err(|_| format!("{name}={value:?} is not a whole number"))
                }
            }
        };
        let call_timeout = match var("SHOP_CALL_TIMEOUT") {
            None => Duration::from_secs(5),
            Some(value) => humantime::parse_duration(&value).map_err(|err| {
                format!("SHOP_CALL_TIMEOUT={value:?} is not a duration such as \"5s\": {err}")
            })?,
        };
        Ok(Settings {
            postgres: var("SHOP_POSTGRES").unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into()),
            database_prefix: var("SHOP_DATABASE_PREFIX").unwrap_or_else(|| "shop_".into()),
            db_connections: u32::try_from(parse("SHOP_DB_CONNECTIONS", 4)?)
                .map_err(|_| "SHOP_DB_CONNECTIONS is too large".to_owned())?,
            redis: var("SHOP_REDIS"),
            cache: match var("SHOP_CACHE").as_deref() {
                None | Some("on") => true,
                Some("off") => false,
                Some(other) => return Err(format!("SHOP_CACHE={other:?}: \"on\" (the default) or \"off\"")),
            },
            gateway: var("SHOP_GATEWAY")
                .unwrap_or_else(|| "http://127.0.0.1:8088".into())
                .trim_end_matches('/')
                .into(),
            admin_url: var("SHOP_ADMIN_URL").map(|url| url.trim_end_matches('/').to_owned()),
            admin_token_file: var("SHOP_ADMIN_TOKEN_FILE").map(PathBuf::from),
            call_timeout,
            port: u16::try_from(parse("PORT", 0)?).map_err(|_| "PORT is not a port number".to_owned())?,
        })
    }

    /// The database a service owns.
    pub fn database(&self, service: Service) -> String {
        format!("{}{}", self.database_prefix, service.owner().name())
    }

    /// Its URL.
    pub fn database_url(&self, service: Service) -> String {
        format!("{}/{}", self.postgres.trim_end_matches('/'), self.database(service))
    }
}
