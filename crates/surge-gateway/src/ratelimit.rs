//! Rate limits: a token bucket per route and client, as GCRA (the generic cell rate algorithm:
//! one "theoretical arrival time" per key instead of a token count). Local to this node by
//! default; shared by every node through Redis when `[store] redis` is set, with the same
//! arithmetic in a Lua script that runs on Redis' clock, so nodes agree whatever their own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use surge_config::{RateKey, RateLimit};

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub allowed: bool,
    /// Requests still allowed at once.
    pub remaining: u32,
    /// When denied: how long until one request will be allowed.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

/// Seconds between requests, and how far ahead of that a burst may run.
fn emission(limit: &RateLimit) -> (f64, f64) {
    let interval = limit.per.as_secs_f64() / f64::from(limit.rate.max(1));
    (interval, interval * f64::from(limit.burst.max(1)))
}

/// GCRA: given the key's theoretical arrival time `tat` (seconds), decides at `now` and returns
/// the new `tat`.
pub fn gcra(tat: Option<f64>, now: f64, limit: &RateLimit) -> (Verdict, f64) {
    let (interval, tolerance) = emission(limit);
    let tat = tat.unwrap_or(now).max(now);
    let next = tat + interval;
    let allow_at = next - tolerance;
    // A nanosecond of slack absorbs floating-point drift in the accumulated arrival time.
    if now + 1e-9 < allow_at {
        let verdict = Verdict {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_secs_f64(allow_at - now),
            reset: Duration::from_secs_f64(tat - now),
        };
        return (verdict, tat);
    }
    let remaining = ((tolerance - (next - now)) / interval + 1e-9).floor().max(0.0) as u32;
    let verdict = Verdict {
        allowed: true,
        remaining,
        retry_after: Duration::ZERO,
        reset: Duration::from_secs_f64(next - now),
    };
    (verdict, next)
}

/// GCRA on Redis: KEYS[1] holds the arrival time; ARGV: interval, tolerance (seconds).
/// Returns {allowed, remaining, retry_after, reset} with the times as strings of seconds.
const GCRA_LUA: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next = tat + interval
local allow_at = next - tolerance
if now + 0.000000001 < allow_at then
  return {0, 0, tostring(allow_at - now), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(next), 'PX', math.ceil((next - now) * 1000) + 1000)
return {1, math.floor((tolerance - (next - now)) / interval + 1e-9), '0', tostring(next - now)}
"#;

/// Where arrival times live.
#[derive(Clone)]
pub enum RateStore {
    Local,
    Redis(ConnectionManager),
}

impl RateStore {
    /// Connects to Redis when a URL is given.
    pub async fn connect(redis: Option<&str>) -> Result<RateStore, String> {
        let Some(url) = redis else { return Ok(RateStore::Local) };
        let client = redis::Client::open(url).map_err(|err| format!("store.redis {url}: {err}"))?;
        let manager = tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client))
            .await
            .map_err(|_| format!("store.redis {url}: no answer within 5 s"))?
            .map_err(|err| format!("store.redis {url}: {err}"))?;
        Ok(RateStore::Redis(manager))
    }
}

/// One route's limit.
pub struct RateLimiter {
    limit: RateLimit,
    /// Prefix of the Redis keys: the route.
    name: String,
    store: RateStore,
    local: Mutex<LocalArrivals>,
    script: redis::Script,
    epoch: Instant,
}

/// Each key's theoretical arrival time, for a limiter without Redis: at most `capacity` keys,
/// so a client inventing keys costs bounded memory, and bounded time per request.
struct LocalArrivals {
    arrivals: HashMap<String, f64>,
    capacity: usize,
    /// When expired keys may next be swept out: at most once a second, so that a map full of
    /// live keys does not cost a pass over all of them per request.
    next_sweep: f64,
}

impl LocalArrivals {
    fn new(capacity: usize) -> Self {
        LocalArrivals { arrivals: HashMap::new(), capacity, next_sweep: 0.0 }
    }

    /// Makes room for `key` if it is new and the map is full: expired keys go first; if all
    /// are live, one is forgotten (its client gets a fresh burst, as after a restart).
    fn make_room(&mut self, key: &str, now: f64) {
        if self.arrivals.len() < self.capacity || self.arrivals.contains_key(key) {
            return;
        }
        if now >= self.next_sweep {
            self.arrivals.retain(|_, tat| *tat > now);
            self.next_sweep = now + SWEEP_INTERVAL;
        }
        if self.arrivals.len() >= self.capacity {
            if let Some(victim) = self.arrivals.keys().next().cloned() {
                self.arrivals.remove(&victim);
            }
        }
    }
}

/// The most keys a local limiter tracks.
const LOCAL_KEYS: usize = 100_000;
/// Seconds between sweeps of expired keys when the local map is full.
const SWEEP_INTERVAL: f64 = 1.0;
/// The longest a request waits for Redis's verdict; past it the request is let through, as on
/// any Redis failure, rather than held.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

impl RateLimiter {
    pub fn new(limit: RateLimit, name: String, store: RateStore) -> Self {
        RateLimiter {
            limit,
            name,
            store,
            local: Mutex::new(LocalArrivals::new(LOCAL_KEYS)),
            script: redis::Script::new(GCRA_LUA),
            epoch: Instant::now(),
        }
    }

    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// The route it limits (`SERVICE:HOSTPREFIX`), also its Redis keys' prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client a request counts for.
    pub fn key(&self, headers: &http::HeaderMap, client: std::net::IpAddr) -> String {
        match &self.limit.key {
            RateKey::Header(name) => match headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                Some(value) => format!("h:{value}"),
                None => format!("ip:{client}"),
            },
            RateKey::ClientIp => format!("ip:{client}"),
        }
    }

    pub async fn check(&self, key: &str) -> Verdict {
        match &self.store {
            RateStore::Local => self.check_local(key),
            RateStore::Redis(connection) => match self.check_redis(connection.clone(), key).await {
                Ok(verdict) => verdict,
                Err(err) => {
                    // A rate limiter must not become the outage: allow, and say so.
                    tracing::warn!("rate limit of {} not checked, Redis failed: {err}", self.name);
                    Verdict {
                        allowed: true,
                        remaining: 0,
                        retry_after: Duration::ZERO,
                        reset: Duration::ZERO,
                    }
                }
            },
        }
    }

    fn check_local(&self, key: &str) -> Verdict {
        let now = self.epoch.elapsed().as_secs_f64();
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.make_room(key, now);
        let (verdict, tat) = gcra(local.arrivals.get(key).copied(), now, &self.limit);
        local.arrivals.insert(key.to_owned(), tat);
        verdict
    }

    async fn check_redis(&self, mut connection: ConnectionManager, key: &str) -> Result<Verdict, String> {
        let (interval, tolerance) = emission(&self.limit);
        let mut invocation = self.script.key(format!("surge:rl:{}:{key}", self.name));
        invocation.arg(interval).arg(tolerance);
        let answer = tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| format!("Redis did not answer within {REDIS_TIMEOUT:?}"))?;
        let (allowed, remaining, retry_after, reset): (u8, u32, String, String) =
            answer.map_err(|err| format!("Redis failed: {err}"))?;
        let seconds = |text: &str| Duration::from_secs_f64(text.parse::<f64>().unwrap_or(0.0).max(0.0));
        Ok(Verdict {
            allowed: allowed == 1,
            remaining,
            retry_after: seconds(&retry_after),
            reset: seconds(&reset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: u32, burst: u32) -> RateLimit {
        RateLimit { rate, per: Duration::from_secs(1), burst, key: RateKey::ClientIp }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let limit = limit(10, 5);
        let mut tat = None;
        let mut allowed = Vec::new();
        // 20 requests at once: the burst passes, the rest wait.
        for _ in 0..20 {
            let (verdict, next) = gcra(tat, 0.0, &limit);
            tat = Some(next);
            allowed.push(verdict.allowed);
        }
        assert_eq!(allowed.iter().filter(|a| **a).count(), 5);
        // Then one every 100 ms.
        let (verdict, _) = gcra(tat, 0.0, &limit);
        assert!(!verdict.allowed);
        assert!((verdict.retry_after.as_secs_f64() - 0.1).abs() < 1e-6, "{verdict:?}");
        let (verdict, _) = gcra(tat, 0.1, &limit);
        assert!(verdict.allowed);
    }

    #[test]
    fn remaining_counts_down() {
        let limit = limit(100, 3);
        let (first, tat) = gcra(None, 5.0, &limit);
        let (second, tat) = gcra(Some(tat), 5.0, &limit);
        let (third, tat) = gcra(Some(tat), 5.0, &limit);
        let (fourth, _) = gcra(Some(tat), 5.0, &limit);
        assert_eq!([first.remaining, second.remaining, third.remaining], [2, 1, 0]);
        assert!(first.allowed && third.allowed && !fourth.allowed);
    }

    #[test]
    fn local_state_stays_bounded_however_many_keys_come() {
        let mut local = LocalArrivals::new(4);
        let limit = limit(1, 1);
        for i in 0..1000 {
            let key = format!("k{i}");
            // All keys stay live (one arrival an hour), so only eviction keeps the bound.
            local.make_room(&key, 0.0);
            let (_, tat) = gcra(
                local.arrivals.get(&key).copied(),
                0.0,
                &RateLimit { per: Duration::from_secs(3600), ..limit.clone() },
            );
            local.arrivals.insert(key, tat);
            assert!(local.arrivals.len() <= 4, "{} keys", local.arrivals.len());
        }
        // A key already tracked keeps its state: its second request within the hour is refused.
        local.make_room("k999", 0.0);
        let slow = RateLimit { per: Duration::from_secs(3600), ..limit };
        let (verdict, _) = gcra(local.arrivals.get("k999").copied(), 0.0, &slow);
        assert!(!verdict.allowed);
        // Expired keys are swept before any live one is forgotten.
        local.make_room("new", 7200.0);
        assert_eq!(local.arrivals.len(), 0, "every key had expired by then");
    }

    /// A Redis that answers the connection's setup, then never again.
    async fn stalling_redis() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut answered = 0;
                    while let Ok(n @ 1..) = socket.read(&mut buf).await {
                        // One `+OK` per command of the setup (each starts with `*`), then silence.
                        let commands = buf[..n].iter().filter(|&&b| b == b'*').count();
                        for _ in 0..commands {
                            if answered < 2 {
                                let _ = socket.write_all(b"+OK\r\n").await;
                                answered += 1;
                            }
                        }
                    }
                });
            }
        });
        format!("redis://{addr}")
    }

    #[tokio::test]
    async fn a_redis_that_stops_answering_lets_requests_through_after_the_timeout() {
        let url = stalling_redis().await;
        let store = RateStore::connect(Some(&url)).await.expect("connects");
        let RateStore::Redis(connection) = store.clone() else { panic!("a Redis store") };
        let limiter = RateLimiter::new(limit(1, 1), "stall".into(), store);
        let guard = Duration::from_secs(30);
        let failed = tokio::time::timeout(guard, limiter.check_redis(connection, "ip:192.0.2.1")).await;
        let failed = failed.expect("the check gave up on Redis instead of waiting for it");
        assert!(failed.is_err_and(|err| err.contains("did not answer within")));
        let verdict = tokio::time::timeout(guard, limiter.check("ip:192.0.2.1")).await.expect("gave up");
        assert!(verdict.allowed, "let through, as on any Redis failure");
    }

    #[test]
    fn a_steady_rate_over_time_is_exact() {
        let limit = limit(50, 1);
        let mut tat = None;
        let mut allowed = 0;
        // 200 requests a second for 4 s.
        for i in 0..800 {
            let (verdict, next) = gcra(tat, f64::from(i) / 200.0, &limit);
            tat = Some(next);
            allowed += u32::from(verdict.allowed);
        }
        assert!((199..=201).contains(&allowed), "{allowed}");
    }
}
