//! Results: HDR histograms summarised, a human table, and JSON.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// Summarises a histogram of nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> Self {
        let us = |v: u64| v as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Locks a tally; a panicked holder leaves plain counters behind, still usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new auto-resizing histogram of nanoseconds with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // 3 significant digits is within hdrhistogram's accepted range (0..=5), so this cannot fail.
    #[allow(clippy::unwrap_used)]
    Histogram::new(3).unwrap()
}

/// The outcome of one relay scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RelayReport {
    /// "paced" or "closed".
    pub mode: String,
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Packet size in bytes.
    pub size: usize,
    /// Offered packets/s over all pairs (paced mode).
    pub offered_pps: Option<f64>,
    /// Seconds spent sending.
    pub seconds: f64,
    /// Packets sent.
    pub sent: u64,
    /// Paced packets that came due while the sender's connection was still pushing back (its
    /// last write not done) and were given up at the sender, as a node's bounded send queue
    /// does; neither sent nor lost.
    pub skipped: u64,
    /// Packets received.
    pub received: u64,
    /// Packets lost.
    pub lost: u64,
    /// Lost share in percent.
    pub loss_pct: f64,
    /// Received packets per second of sending time.
    pub delivered_pps: f64,
    /// Received payload megabytes (10^6) per second.
    pub delivered_mbps: f64,
    /// One-way latency.
    pub latency: Latency,
    /// The light probe pair, when one ran beside the load.
    pub probe: Option<Probe>,
}

/// What the probe pair (a light client beside the load) saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    /// Packets it sent.
    pub sent: u64,
    /// Packets its partner received.
    pub received: u64,
    /// Their one-way latency.
    pub latency: Latency,
}

impl fmt::Display for RelayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "relay {} | {} pairs x {} B | {:.1} s", self.mode, self.pairs, self.size, self.seconds)?;
        if let Some(o) = self.offered_pps {
            writeln!(f, "  offered      {o:>12.0} packets/s")?;
        }
        writeln!(f, "  delivered    {:>12.0} packets/s   {:>8.1} MB/s", self.delivered_pps, self.delivered_mbps)?;
        writeln!(
            f,
            "  sent/recv    {:>12} / {}   lost {} ({:.3} %)",
            self.sent, self.received, self.lost, self.loss_pct
        )?;
        if self.skipped > 0 {
            writeln!(f, "  skipped      {:>12} at the sender (its connection pushed back)", self.skipped)?;
        }
        let l = &self.latency;
        write!(
            f,
            "  latency us   p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        )?;
        if let Some(p) = &self.probe {
            write!(
                f,
                "\n  probe pair   sent {} received {}   latency us p50 {:.0}  p99 {:.0}  max {:.0}",
                p.sent, p.received, p.latency.p50_us, p.latency.p99_us, p.latency.max_us
            )?;
        }
        Ok(())
    }
}

/// Live counters of the running scenario: what a terminal shows once a second while it runs.
#[derive(Debug)]
pub struct Progress {
    sent: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// The process's progress counters (scenarios add to them; only the display reads them).
pub static PROGRESS: Progress = Progress::new();

impl Progress {
    const fn new() -> Self {
        use std::sync::atomic::AtomicU64;
        Progress { sent: AtomicU64::new(0), done: AtomicU64::new(0), failed: AtomicU64::new(0) }
    }

    /// Counts packets or requests sent.
    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts packets received or requests answered.
    pub fn done(&self, n: u64) {
        self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts failures.
    pub fn failed(&self, n: u64) {
        self.failed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn snapshot(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.sent.load(Relaxed), self.done.load(Relaxed), self.failed.load(Relaxed))
    }
}

/// One progress line: elapsed (of the planned time), counts since the start, and the rate of
/// the last interval.
pub fn progress_line(
    label: &str,
    elapsed: std::time::Duration,
    planned: Option<std::time::Duration>,
    (sent, done, failed): (u64, u64, u64),
    rate: f64,
) -> String {
    let time = match planned {
        Some(p) => format!("{:>5.1}/{:.0} s", elapsed.as_secs_f64(), p.as_secs_f64()),
        None => format!("{:>5.1} s", elapsed.as_secs_f64()),
    };
    format!("{label} {time}  sent {sent}  done {done} ({rate:.0}/s)  failed {failed}")
}

/// Runs `work`, showing a live progress line on standard error once a second when it is a
/// terminal (never in pipes or logs, so `--json` output and CI logs stay clean).
pub async fn with_progress<T>(
    label: &str,
    planned: Option<std::time::Duration>,
    work: impl std::future::Future<Output = T>,
) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let start = std::time::Instant::now();
    let base = PROGRESS.snapshot();
    let mut last = (start, base.1);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.tick().await;
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => {
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
                return out;
            }
            _ = tick.tick() => {
                let now = PROGRESS.snapshot();
                let counts = (now.0 - base.0, now.1 - base.1, now.2 - base.2);
                let rate = (now.1 - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
                last = (std::time::Instant::now(), now.1);
                let line = progress_line(label, start.elapsed(), planned, counts, rate);
                let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
            }
        }
    }
}

#[cfg(test)]
mod progress_tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn progress_lines_read_well() {
        let line = progress_line("relay", Duration::from_millis(2500), Some(Duration::from_secs(10)), (10, 8, 1), 3.2);
        assert_eq!(line, "relay   2.5/10 s  sent 10  done 8 (3/s)  failed 1");
        assert_eq!(
            progress_line("idle", Duration::from_secs(1), None, (0, 5, 0), 5.0),
            "idle   1.0 s  sent 0  done 5 (5/s)  failed 0"
        );
    }

    #[tokio::test]
    async fn without_a_terminal_the_work_just_runs() {
        // Test output is captured, never a terminal.
        assert_eq!(with_progress("x", None, async { 7 }).await, 7);
    }
}
