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
        let l = &self.latency;
        write!(
            f,
            "  latency us   p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        )
    }
}
