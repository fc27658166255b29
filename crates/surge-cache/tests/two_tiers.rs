//! The cache against the Redis on this machine (127.0.0.1:6379): each test names its cache
//! uniquely, so that runs and tests do not see each other's keys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use surge_cache::{Cache, CacheConfig, CacheStats};

const REDIS: &str = "redis://127.0.0.1:6379";

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), fastrand::u64(..))
}

fn config(name: &str, redis: bool) -> CacheConfig {
    CacheConfig { redis: redis.then(|| REDIS.to_owned()), ..CacheConfig::new(name, Duration::from_secs(60)) }
}

type Loaded = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Bytes>, String>> + Send>>;

/// A loader that counts its runs and answers `value` after a moment (so that callers pile up).
fn loader(runs: &Arc<AtomicU64>, value: Option<&'static str>) -> impl FnOnce() -> Loaded {
    let runs = Arc::clone(runs);
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(value.map(|v| Bytes::from_static(v.as_bytes())))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_for_one_key_load_it_once() {
    let cache = Cache::open(config(&unique("stampede"), true)).await;
    let runs = Arc::new(AtomicU64::new(0));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..1_000 {
        let (cache, runs) = (Arc::clone(&cache), Arc::clone(&runs));
        readers.spawn(async move { cache.get_or_load("user:1", loader(&runs, Some("ada"))).await });
    }
    while let Some(read) = readers.join_next().await {
        assert_eq!(read.expect("reader").expect("loaded").as_deref(), Some(&b"ada"[..]));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one load for a thousand readers");
    let stats = cache.metrics().stats();
    assert_eq!(stats.loads, 1);
    assert_eq!(stats.local_hits + stats.collapsed, 999, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_one_process_loaded_is_a_redis_hit_for_another_and_an_invalidation_reaches_both() {
    let name = unique("shared");
    let (first, second) = (Cache::open(config(&name, true)).await, Cache::open(config(&name, true)).await);
    let runs = Arc::new(AtomicU64::new(0));
    let read = |cache: &Arc<Cache>, value| {
        let (cache, runs) = (Arc::clone(cache), Arc::clone(&runs));
        async move { cache.get_or_load("product:7", loader(&runs, Some(value))).await.expect("read") }
    };
    assert_eq!(read(&first, "v1").await.as_deref(), Some(&b"v1"[..]));
    assert_eq!(read(&second, "never loaded").await.as_deref(), Some(&b"v1"[..]), "from Redis");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(second.metrics().stats().redis_hits, 1);
    // Now in both local tiers; invalidated by the first, the second hears of it.
    first.invalidate("product:7").await;
    let mut reloaded = None;
    for _ in 0..200 {
        let value = read(&second, "v2").await;
        if value.as_deref() == Some(&b"v2"[..]) {
            reloaded = value;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reloaded.as_deref(), Some(&b"v2"[..]), "the second process dropped its copy and loaded again");
    assert_eq!(
        read(&first, "v3").await.as_deref(),
        Some(&b"v2"[..]),
        "the reload went to Redis for the first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_remembered_only_with_negative_caching() {
    let runs = Arc::new(AtomicU64::new(0));
    let without = Cache::open(config(&unique("nothing"), true)).await;
    for _ in 0..2 {
        assert_eq!(without.get_or_load("user:404", loader(&runs, None)).await.expect("read"), None);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "not remembered: each read asks the loader");

    let runs = Arc::new(AtomicU64::new(0));
    let negative =
        CacheConfig { negative_ttl: Some(Duration::from_secs(60)), ..config(&unique("negative"), true) };
    let with = Cache::open(negative.clone()).await;
    for _ in 0..3 {
        assert_eq!(with.get_or_load("user:404", loader(&runs, None)).await.expect("read"), None);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(with.metrics().stats().negative_hits, 2);
    // Known missing in Redis too, for another process.
    let other = Cache::open(negative).await;
    assert_eq!(other.get_or_load("user:404", loader(&runs, Some("no"))).await.expect("read"), None);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_reaches_every_waiter_and_is_not_kept() {
    let cache = Cache::open(config(&unique("failing"), false)).await;
    let failing = || async { Err::<Option<Bytes>, _>("the database is down".to_owned()) };
    let error = cache.get_or_load("user:1", failing).await.expect_err("failed");
    assert_eq!(*error, "the database is down");
    let runs = Arc::new(AtomicU64::new(0));
    let value = cache.get_or_load("user:1", loader(&runs, Some("back"))).await.expect("read");
    assert_eq!((value.as_deref(), runs.load(Ordering::SeqCst)), (Some(&b"back"[..]), 1));
    assert_eq!(cache.metrics().stats().load_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_unreachable_reads_are_served_by_the_loader_and_the_local_tier() {
    // Port 1: nothing listens there.
    let config = CacheConfig { redis: Some("redis://127.0.0.1:1".into()), ..config(&unique("down"), false) };
    let cache = Cache::open(config).await;
    let runs = Arc::new(AtomicU64::new(0));
    for _ in 0..3 {
        let value = cache.get_or_load("user:1", loader(&runs, Some("local"))).await.expect("read");
        assert_eq!(value.as_deref(), Some(&b"local"[..]));
    }
    let stats = cache.metrics().stats();
    assert_eq!((runs.load(Ordering::SeqCst), stats.local_hits), (1, 2), "{stats:?}");
    assert!(stats.redis_errors >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_tier_stays_within_its_bytes_under_many_keys() {
    let config = CacheConfig { max_bytes: 1 << 20, ..config(&unique("bounded"), false) };
    let cache = Cache::open(config).await;
    let value = Bytes::from(vec![b'x'; 4 * 1024]);
    for key in 0..2_000 {
        let value = value.clone();
        let read =
            cache.get_or_load(&format!("key:{key}"), || async move { Ok::<_, String>(Some(value)) }).await;
        assert!(read.expect("read").is_some());
    }
    let held = cache.local_bytes().await;
    // 2,000 values of 4 KiB (8 MiB) offered to a tier of 1 MiB.
    assert!(held <= 1 << 20, "the local tier holds {held} bytes");
    assert!(held > 0);
    assert_eq!(cache.metrics().stats(), CacheStats { loads: 2_000, ..CacheStats::default() });
}
