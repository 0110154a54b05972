//! The operator's Prometheus metrics, one struct passed in through the Context (no globals), bounded labels.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Reconcile counters and timings.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by outcome (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciles by error kind ([`crate::Error::kind`]).
    pub failures: IntCounterVec,
    /// Reconcile duration.
    pub duration: HistogramVec,
    /// 1 while this replica holds the leader lease (or runs without election).
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in their own registry.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("kefu_operator".into()), None).unwrap_or_default();
        let m = Metrics {
            reconciles: IntCounterVec::new(Opts::new("reconciles_total", "Reconciles by outcome"), &["outcome"])
                .expect("valid metric"),
            failures: IntCounterVec::new(
                Opts::new("reconcile_failures_total", "Failed reconciles by error kind"),
                &["kind"],
            )
            .expect("valid metric"),
            duration: HistogramVec::new(
                HistogramOpts::new("reconcile_duration_seconds", "Time spent in one reconcile")
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["outcome"],
            )
            .expect("valid metric"),
            leader: IntGauge::new("leader", "1 while this replica is the active controller").expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.failures.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.leader.clone()),
        ] {
            let _ = m.registry.register(c);
        }
        m
    }

    /// Record one finished reconcile.
    pub fn observe(&self, seconds: f64, error: Option<&crate::Error>) {
        let outcome = if error.is_some() { "error" } else { "ok" };
        self.reconciles.with_label_values(&[outcome]).inc();
        self.duration.with_label_values(&[outcome]).observe(seconds);
        if let Some(e) = error {
            self.failures.with_label_values(&[e.kind()]).inc();
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_bounded_kind() {
        let m = Metrics::new();
        m.observe(0.02, None);
        m.observe(0.5, Some(&crate::Error::InvalidSpec("anything at all".into())));
        let text = m.render();
        assert!(text.contains("kefu_operator_reconciles_total{outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("kefu_operator_reconcile_failures_total{kind=\"invalid_spec\"} 1"), "{text}");
        assert!(!text.contains("anything at all"));
    }
}
