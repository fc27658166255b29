//! Cache-aside reads, shared by the users and catalog services: a JSON document by key, from
//! the two-tier cache (`surge-cache`: in process, then Redis) or else from the database, and
//! whether the cache had it (answered as `x-shop-cache: hit | miss`, so a client or a test
//! can see it). `SHOP_CACHE=off` turns the tier off, for measuring what it saves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use surge_cache::{Cache, CacheConfig};

use crate::app::ApiResult;
use crate::settings::Settings;
use crate::Service;

/// A service's documents, cached or not.
pub struct Aside {
    cache: Option<Arc<Cache>>,
}

/// Where a read came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hit,
    Miss,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
        }
    }
}

impl Aside {
    pub async fn open(settings: &Settings, service: Service, ttl: Duration) -> Aside {
        if !settings.cache {
            return Aside { cache: None };
        }
        let config = CacheConfig {
            redis: settings.redis.clone(),
            negative_ttl: Some(Duration::from_secs(5)),
            // Named after the database, so two shops sharing a Redis never see each other's.
            ..CacheConfig::new(&settings.database(service), ttl)
        };
        Aside { cache: Some(Cache::open(config).await) }
    }

    /// The document under `key`: `load` finds it in the database when the cache has not.
    pub async fn read<T, F>(&self, key: &str, load: F) -> ApiResult<(Option<Bytes>, Source)>
    where
        T: Serialize,
        F: AsyncFnOnce() -> ApiResult<Option<T>>,
    {
        let json =
            |value: Option<T>| value.map(|value| Bytes::from(serde_json::to_vec(&value).unwrap_or_default()));
        let Some(cache) = &self.cache else { return Ok((json(load().await?), Source::Miss)) };
        let loaded = AtomicBool::new(false);
        let found = cache
            .get_or_load(key, async || -> ApiResult<Option<Bytes>> {
                loaded.store(true, Ordering::Relaxed);
                Ok(json(load().await?))
            })
            .await
            .map_err(|err| (*err).clone())?;
        let source = if loaded.load(Ordering::Relaxed) { Source::Miss } else { Source::Hit };
        Ok((found, source))
    }

    /// After a write: every process drops `key`.
    pub async fn invalidate(&self, key: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key).await;
        }
    }
}
