//! The node's Prometheus metrics, created once and passed to whoever records them (no globals).
//! Labels are bounded: roles, frame types and error codes are closed sets.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the node exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    pub frames_in: IntCounterVec,
    pub frames_out: IntCounterVec,
    pub errors: IntCounterVec,
    pub delivery_latency: Histogram,
    pub message_stage: HistogramVec,
    pub engine_step: HistogramVec,
    pub queue_wait: Histogram,
    pub first_response: Histogram,
    pub assignments: IntCounterVec,
    pub queued: IntGauge,
    pub open_conversations: IntGauge,
    pub entries: IntCounter,
    pub slow_consumers: IntCounter,
    pub store_commit: HistogramVec,
    pub offline_entries: IntCounter,
    pub unindexed_ops: IntGauge,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
const WAIT_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("kefu".into()), None).unwrap_or_default();
        let m = Metrics {
            connections: IntGaugeVec::new(Opts::new("connections", "Open client connections"), &["role"])
                .unwrap_or_else(|_| unreachable_metric()),
            frames_in: IntCounterVec::new(Opts::new("frames_in_total", "Client frames received"), &["type"])
                .unwrap_or_else(|_| unreachable_metric()),
            frames_out: IntCounterVec::new(Opts::new("frames_out_total", "Frames written to clients"), &["role"])
                .unwrap_or_else(|_| unreachable_metric()),
            errors: IntCounterVec::new(Opts::new("errors_total", "Error frames sent, by code"), &["code"])
                .unwrap_or_else(|_| unreachable_metric()),
            delivery_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "delivery_latency_seconds",
                    "From a frame read off its socket to its entry being durable and queued to every recipient",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .unwrap_or_else(|_| unreachable_metric()),
            message_stage: HistogramVec::new(
                HistogramOpts::new(
                    "message_stage_seconds",
                    "Where delivery latency goes: stage=\"engine_queue\" a frame read off its socket until the engine \
                     takes it, stage=\"durable_wait\" a batch handed to the store until the engine sees it durable",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["stage"],
            )
            .unwrap_or_else(|_| unreachable_metric()),
            engine_step: HistogramVec::new(
                HistogramOpts::new(
                    "engine_step_seconds",
                    "Time the engine spent on one step (a command, a durable batch, a tick); every connection waits meanwhile",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["step"],
            )
            .unwrap_or_else(|_| unreachable_metric()),
            queue_wait: Histogram::with_opts(
                HistogramOpts::new("queue_wait_seconds", "Time a conversation waited in the queue before assignment")
                    .buckets(WAIT_BUCKETS.to_vec()),
            )
            .unwrap_or_else(|_| unreachable_metric()),
            first_response: Histogram::with_opts(
                HistogramOpts::new("first_response_seconds", "From conversation open to the first agent message")
                    .buckets(WAIT_BUCKETS.to_vec()),
            )
            .unwrap_or_else(|_| unreachable_metric()),
            assignments: IntCounterVec::new(
                Opts::new("assignments_total", "Conversations assigned to agents, by how"),
                &["via"],
            )
            .unwrap_or_else(|_| unreachable_metric()),
            queued: IntGauge::new("queued_conversations", "Conversations waiting for an agent")
                .unwrap_or_else(|_| unreachable_metric()),
            open_conversations: IntGauge::new("open_conversations", "Conversations not closed")
                .unwrap_or_else(|_| unreachable_metric()),
            entries: IntCounter::new("entries_total", "Log entries made durable")
                .unwrap_or_else(|_| unreachable_metric()),
            slow_consumers: IntCounter::new("slow_consumers_total", "Connections closed for not reading")
                .unwrap_or_else(|_| unreachable_metric()),
            store_commit: HistogramVec::new(
                HistogramOpts::new(
                    "store_commit_seconds",
                    "Store commit duration: store=\"wal\" a log group commit (fdatasync), store=\"index\" a redb index batch",
                )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["store"],
            )
            .unwrap_or_else(|_| unreachable_metric()),
            offline_entries: IntCounter::new("offline_entries_total", "Entries written to the offline inbox")
                .unwrap_or_else(|_| unreachable_metric()),
            unindexed_ops: IntGauge::new(
                "store_unindexed_ops",
                "Writes durable in the log but not yet in the redb index (held in memory); grows without bound \
                 only if index commits fail",
            )
            .unwrap_or_else(|_| unreachable_metric()),
            registry,
        };
        m.register();
        m
    }

    fn register(&self) {
        let r = &self.registry;
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.connections.clone()),
            Box::new(self.frames_in.clone()),
            Box::new(self.frames_out.clone()),
            Box::new(self.errors.clone()),
            Box::new(self.delivery_latency.clone()),
            Box::new(self.message_stage.clone()),
            Box::new(self.engine_step.clone()),
            Box::new(self.queue_wait.clone()),
            Box::new(self.first_response.clone()),
            Box::new(self.assignments.clone()),
            Box::new(self.queued.clone()),
            Box::new(self.open_conversations.clone()),
            Box::new(self.entries.clone()),
            Box::new(self.slow_consumers.clone()),
            Box::new(self.store_commit.clone()),
            Box::new(self.offline_entries.clone()),
            Box::new(self.unindexed_ops.clone()),
        ];
        for c in all {
            // Names are unique by construction; a failure here is a programming error caught in tests.
            if let Err(e) = r.register(c) {
                tracing::error!(error = %e, "metric registration failed");
            }
        }
        for role in ["visitor", "agent"] {
            self.connections.with_label_values(&[role]).set(0);
        }
    }

    /// Text exposition format for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cold]
fn unreachable_metric<T>() -> T {
    // Metric options are static and valid; prometheus only fails on invalid names.
    panic!("invalid metric definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_includes_required_metric_names() {
        let m = Metrics::new();
        m.frames_in.with_label_values(&["send"]).inc();
        m.assignments.with_label_values(&["accept"]).inc();
        let text = m.render();
        for name in [
            "kefu_connections{role=\"visitor\"}",
            "kefu_frames_in_total",
            "kefu_delivery_latency_seconds",
            "kefu_queue_wait_seconds",
            "kefu_first_response_seconds",
            "kefu_assignments_total",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
