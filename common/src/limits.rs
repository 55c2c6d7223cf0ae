//! Abuse limits shared by the relay and the edge: token buckets, the accept gate (global accept
//! rate and connections per source IP), and a log limiter so that a flood cannot fill the disk.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Changes the rate and size from `now` on; tokens already held stay, up to the new size.
    pub fn set_rate(&mut self, rate: f64, burst: f64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst;
        self.tokens = self.tokens.min(burst);
    }

    /// Whether the bucket would be full at `now` (a source idle that long is like a new one).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate >= self.burst
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn try_take(&mut self, now: Instant, n: f64) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            return true;
        }
        false
    }

    /// How long until the bucket holds `n` tokens (zero when it does now).
    pub fn time_until(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        if self.tokens >= n || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((n - self.tokens) / self.rate)
    }

    /// Takes `n` tokens, going into debt if needed; returns how long until the debt is repaid
    /// (zero when there was none). The caller waits that long before taking more.
    pub fn take(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.tokens / self.rate)
    }
}

/// Jittered exponential backoff: `initial` doubling per failure up to `max`, then scaled by a
/// random 50-150 % so that many clients that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure, before jitter.
    pub initial: Duration,
    /// The longest delay, before jitter.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `initial` to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The delay after `failures` consecutive failures (0 for a first retry after a clean end).
    pub fn delay(&self, failures: u32) -> Duration {
        let jitter = f64::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 1000) / 1000.0;
        self.delay_with(failures, jitter)
    }

    /// The delay after `failures` failures with a given jitter in `0.0..1.0`.
    pub fn delay_with(&self, failures: u32, jitter: f64) -> Duration {
        let base = self.initial.saturating_mul(1 << failures.min(7)).min(self.max);
        base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
    }
}

/// Why a new connection was turned away before TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// More connections per second than `limits.accept_rate` allows.
    AcceptRate,
    /// The source address already holds `limits.max_conns_per_ip` connections.
    PerIp,
}

impl Rejected {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Rejected::AcceptRate => "accept_rate",
            Rejected::PerIp => "per_ip",
        }
    }
}

/// Admits new connections: a global accept-rate bucket and a cap per source address.
#[derive(Debug)]
pub struct AcceptGate {
    rate: Mutex<TokenBucket>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_per_ip: AtomicU32,
}

/// Holds one connection's place in the per-address count until dropped.
#[derive(Debug)]
pub struct ConnSlot {
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.per_ip);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay consistent through a panic elsewhere: a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AcceptGate {
    /// `rate` accepts per second with `burst`, at most `max_per_ip` open per address.
    pub fn new(rate: u32, burst: u32, max_per_ip: u32, now: Instant) -> Self {
        AcceptGate {
            rate: Mutex::new(TokenBucket::new(f64::from(rate), f64::from(burst), now)),
            per_ip: Arc::default(),
            max_per_ip: AtomicU32::new(max_per_ip),
        }
    }

    /// New limits from `now` on (a configuration reload). Connections already admitted stay,
    /// even where an address now holds more than `max_per_ip`; it gets no more until under.
    pub fn set_limits(&self, rate: u32, burst: u32, max_per_ip: u32, now: Instant) {
        lock(&self.rate).set_rate(f64::from(rate), f64::from(burst), now);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<ConnSlot, Rejected> {
        let mut map = lock(&self.per_ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(Rejected::PerIp);
        }
        if !lock(&self.rate).try_take(now, 1.0) {
            if *n == 0 {
                map.remove(&ip);
            }
            return Err(Rejected::AcceptRate);
        }
        *n += 1;
        Ok(ConnSlot { ip, per_ip: self.per_ip.clone() })
    }
}

/// Lets one log line through per `every`, counting what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    every_ms: u64,
    start: Instant,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every_ms: every.as_millis().try_into().unwrap_or(u64::MAX),
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the
    /// last one; `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now.saturating_add(self.every_ms), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert!(b.delay(0) <= Duration::from_millis(150));
        for f in 0..40 {
            assert!(b.delay(f) <= b.max.mul_f64(1.5));
        }
        assert!(b.delay(20) >= b.max / 2);
        assert_eq!(b.delay_with(1, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay_with(30, 0.0), Duration::from_secs(5));
    }

    #[test]
    fn bucket_refills_at_its_rate_and_caps_at_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert!(b.try_take(t0, 1.0));
        }
        assert!(!b.try_take(t0, 1.0));
        assert!(b.try_take(t0 + Duration::from_millis(100), 1.0), "one token after 100 ms at 10/s");
        assert!(!b.try_take(t0 + Duration::from_millis(100), 1.0));
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        assert!(b.try_take(t0 + Duration::from_secs(100), 5.0), "never more than the burst");
        assert!(!b.try_take(t0 + Duration::from_secs(100), 1.0));
    }

    #[test]
    fn debt_tells_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000.0, t0);
        assert_eq!(b.take(t0, 500.0), Duration::ZERO);
        let wait = b.take(t0, 1500.0);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.take(t0 + Duration::from_secs(1), 0.0), Duration::ZERO);
    }

    #[test]
    fn gate_caps_per_address_and_frees_slots() {
        let t0 = Instant::now();
        let gate = AcceptGate::new(1000, 1000, 2, t0);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let a = gate.admit(ip, t0).expect("first");
        let _b = gate.admit(ip, t0).expect("second");
        assert_eq!(gate.admit(ip, t0).err(), Some(Rejected::PerIp));
        assert!(gate.admit(other, t0).is_ok(), "other addresses are not affected");
        drop(a);
        assert!(gate.admit(ip, t0).is_ok(), "a closed connection frees its slot");
    }

    #[test]
    fn gate_limits_the_accept_rate() {
        let t0 = Instant::now();
        let gate = AcceptGate::new(2, 3, 100, t0);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let held: Vec<_> = (0..3).map(|_| gate.admit(ip, t0).expect("burst")).collect();
        assert_eq!(gate.admit(ip, t0).err(), Some(Rejected::AcceptRate));
        assert!(gate.admit(ip, t0 + Duration::from_millis(500)).is_ok());
        drop(held);
        assert!(lock(&gate.per_ip).is_empty(), "every slot released, nothing left behind");
    }

    #[test]
    fn new_gate_limits_apply_to_the_next_connection_and_keep_the_admitted_ones() {
        let t0 = Instant::now();
        let gate = AcceptGate::new(1000, 1000, 3, t0);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let held: Vec<_> = (0..3).map(|_| gate.admit(ip, t0).expect("under the old cap")).collect();
        gate.set_limits(1000, 1000, 1, t0);
        assert_eq!(gate.admit(ip, t0).err(), Some(Rejected::PerIp));
        drop(held);
        let _one = gate.admit(ip, t0).expect("room again once under the new cap");
        assert_eq!(gate.admit(ip, t0).err(), Some(Rejected::PerIp));
        gate.set_limits(1, 1, 100, t0);
        let _two = gate.admit(ip, t0).expect("a smaller bucket keeps what it can hold: one token");
        assert_eq!(gate.admit(ip, t0).err(), Some(Rejected::AcceptRate));
        assert!(gate.admit(ip, t0 + Duration::from_secs(1)).is_ok(), "and refills at the new rate");
    }

    #[test]
    fn log_limiter_lets_one_through_per_period_and_counts_the_rest() {
        let l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.suppressed.load(Ordering::Relaxed), 2);
    }
}
