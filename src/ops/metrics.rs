//! Prometheus metrics. Names are constants here; labels take a few fixed values only (table,
//! op, event type, outcome class, route, status, check) — never URLs, ids or account ids.
//!
//! What must hold: every name starts with `walhook_`, carries its unit, and counters end in
//! `_total`; each process has its own registry (no globals), so two walhook instances in one
//! test process do not mix their numbers.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::model::event::EventType;

/// Row changes decoded, by table and op.
pub const CHANGES_TOTAL: &str = "walhook_replication_changes_total";
/// Truncates seen (they produce no events).
pub const TRUNCATES_TOTAL: &str = "walhook_replication_truncates_total";
/// Rows that could not be routed because their image lacked `account_id`.
pub const UNROUTABLE_TOTAL: &str = "walhook_replication_unroutable_rows_total";
/// Bytes of WAL the slot holds beyond its confirmed position.
pub const SLOT_LAG_BYTES: &str = "walhook_replication_slot_lag_bytes";
/// Seconds since the last commit read from the stream.
pub const LAST_COMMIT_AGE_SECONDS: &str = "walhook_replication_last_commit_age_seconds";
/// 1 while the replication stream is open.
pub const STREAMING: &str = "walhook_replication_streaming";
/// Replication sessions re-established after a failure.
pub const RECONNECTS_TOTAL: &str = "walhook_replication_reconnects_total";
/// Events routed to at least one endpoint, by event type.
pub const EVENTS_TOTAL: &str = "walhook_events_total";
/// Deliveries created, by path (`direct`: sent from memory, `outbox`: stored for later).
pub const DELIVERIES_TOTAL: &str = "walhook_deliveries_total";
/// HTTP attempts by outcome class (2xx, 3xx, 4xx, 5xx, timeout, network, refused, local).
pub const ATTEMPTS_TOTAL: &str = "walhook_dispatch_attempts_total";
/// Deliveries that gave up after their last attempt.
pub const FAILED_TOTAL: &str = "walhook_dispatch_failed_deliveries_total";
/// Commit of the source transaction to a 2xx answer.
pub const COMMIT_TO_DELIVERED_SECONDS: &str = "walhook_dispatch_commit_to_delivered_seconds";
/// Duration of one HTTP attempt.
pub const REQUEST_DURATION_SECONDS: &str = "walhook_dispatch_request_duration_seconds";
/// HTTP requests in flight.
pub const IN_FLIGHT_REQUESTS: &str = "walhook_dispatch_in_flight_requests";
/// Deliveries waiting in the outbox.
pub const PENDING_DELIVERIES: &str = "walhook_dispatch_pending_deliveries";
/// Age of the oldest delivery waiting in the outbox for an active endpoint (one paused by
/// hand waits on purpose).
pub const OLDEST_PENDING_AGE_SECONDS: &str = "walhook_dispatch_oldest_pending_age_seconds";
/// Deliveries waiting in memory.
pub const QUEUED_DELIVERIES: &str = "walhook_dispatch_queued_deliveries";
/// Endpoints by state (active, disabled).
pub const ENDPOINTS: &str = "walhook_endpoints";
/// Endpoints disabled automatically, by reason (gone, failing).
pub const ENDPOINTS_DISABLED_TOTAL: &str = "walhook_endpoints_disabled_total";
/// Admin API requests by route and status.
pub const API_REQUESTS_TOTAL: &str = "walhook_api_requests_total";
/// Admin API request duration by route.
pub const API_REQUEST_DURATION_SECONDS: &str = "walhook_api_request_duration_seconds";
/// Rows removed by retention, by table.
pub const RETENTION_DELETED_TOTAL: &str = "walhook_retention_deleted_rows_total";
/// 1 while the store writer cannot commit (see `database.write_stall_after`).
pub const STORE_STALLED: &str = "walhook_store_stalled";
/// Delivery records the database refuses in every form, kept and tried again: each holds the
/// slot until it is stored.
pub const STORE_PINNED_RECORDS: &str = "walhook_store_pinned_records";
/// Store writes the database refused, by what was done with them (`without_texts`, `failed`,
/// `rejected`).
pub const STORE_SET_ASIDE_TOTAL: &str = "walhook_store_set_aside_total";
/// 1 while the slot walhook streamed from is missing or invalidated (waiting for
/// `walhook slot-reset`).
pub const SLOT_LOST: &str = "walhook_replication_slot_lost";
/// 1 when the slot is a failover slot (PostgreSQL 17+: a standby with
/// `sync_replication_slots = on` carries it).
pub const SLOT_FAILOVER: &str = "walhook_replication_slot_failover";
/// Standby slots the primary names in `synchronized_standby_slots`.
pub const FAILOVER_STANDBYS: &str = "walhook_replication_failover_standbys";
/// 1 when a failover now would find the slot on a standby, as far as the primary can tell: a
/// failover slot, and every standby named in `synchronized_standby_slots` connected with the
/// WAL up to the slot's confirmed position.
pub const FAILOVER_READY: &str = "walhook_replication_failover_ready";
/// Physical slots a standby streams from now (named in `synchronized_standby_slots` or not).
pub const PHYSICAL_STANDBYS: &str = "walhook_replication_physical_standbys";
/// 1 while the primary holds back every change from walhook for a standby slot named in
/// `synchronized_standby_slots` that no standby streams from.
pub const HELD_BACK: &str = "walhook_replication_held_back_by_standby";
/// 1 while a prerequisite re-checked during streaming fails, by check (table,
/// replica_identity, publication).
pub const PREREQUISITE_FAILING: &str = "walhook_replication_prerequisite_failing";
/// Event payload bytes held in memory (waiting, in flight, on their way to the store).
pub const PAYLOAD_MEMORY_BYTES: &str = "walhook_dispatch_payload_memory_bytes";
/// `dispatch.memory_limit`: the most [`PAYLOAD_MEMORY_BYTES`] may reach.
pub const PAYLOAD_MEMORY_LIMIT_BYTES: &str = "walhook_dispatch_payload_memory_limit_bytes";
/// Rows backfills handed to dispatch (`*.backfilled` events), once their chunk settled.
pub const BACKFILL_ROWS_TOTAL: &str = "walhook_backfill_rows_total";
/// Backfill chunks, by outcome (`sent`: settled; `retried`: read again because the stream
/// could not line it up, e.g. after a reconnect between its watermarks).
pub const BACKFILL_CHUNKS_TOTAL: &str = "walhook_backfill_chunks_total";
/// Backfills running (status `running`), as the streaming replica last read them.
pub const BACKFILLS_RUNNING: &str = "walhook_backfills_running";

/// Every metric of one walhook process.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// See [`CHANGES_TOTAL`].
    pub changes: IntCounterVec,
    /// See [`TRUNCATES_TOTAL`].
    pub truncates: IntCounterVec,
    /// See [`BACKFILL_ROWS_TOTAL`].
    pub backfill_rows: IntCounter,
    /// See [`BACKFILL_CHUNKS_TOTAL`].
    pub backfill_chunks: IntCounterVec,
    /// See [`BACKFILLS_RUNNING`].
    pub backfills_running: IntGauge,
    /// See [`UNROUTABLE_TOTAL`].
    pub unroutable: IntCounterVec,
    /// See [`SLOT_LAG_BYTES`].
    pub slot_lag_bytes: IntGauge,
    /// See [`LAST_COMMIT_AGE_SECONDS`].
    pub last_commit_age: prometheus::Gauge,
    /// See [`STREAMING`].
    pub streaming: IntGauge,
    /// See [`RECONNECTS_TOTAL`].
    pub reconnects: IntCounter,
    /// See [`EVENTS_TOTAL`].
    pub events: IntCounterVec,
    /// See [`DELIVERIES_TOTAL`].
    pub deliveries: IntCounterVec,
    /// See [`ATTEMPTS_TOTAL`].
    pub attempts: IntCounterVec,
    /// See [`FAILED_TOTAL`].
    pub failed: IntCounter,
    /// See [`COMMIT_TO_DELIVERED_SECONDS`].
    pub commit_to_delivered: Histogram,
    /// See [`REQUEST_DURATION_SECONDS`].
    pub request_duration: Histogram,
    /// See [`IN_FLIGHT_REQUESTS`].
    pub in_flight: IntGauge,
    /// See [`PENDING_DELIVERIES`].
    pub pending: IntGauge,
    /// See [`OLDEST_PENDING_AGE_SECONDS`].
    pub oldest_pending_age: prometheus::Gauge,
    /// See [`QUEUED_DELIVERIES`].
    pub queued: IntGauge,
    /// See [`ENDPOINTS`].
    pub endpoints: IntGaugeVec,
    /// See [`ENDPOINTS_DISABLED_TOTAL`].
    pub endpoints_disabled: IntCounterVec,
    /// See [`API_REQUESTS_TOTAL`].
    pub api_requests: IntCounterVec,
    /// See [`API_REQUEST_DURATION_SECONDS`].
    pub api_duration: HistogramVec,
    /// See [`RETENTION_DELETED_TOTAL`].
    pub retention_deleted: IntCounterVec,
    /// See [`STORE_STALLED`].
    pub store_stalled: IntGauge,
    /// See [`STORE_PINNED_RECORDS`].
    pub store_pinned: IntGauge,
    /// See [`STORE_SET_ASIDE_TOTAL`].
    pub store_set_aside: IntCounterVec,
    /// See [`SLOT_LOST`].
    pub slot_lost: IntGauge,
    /// See [`PREREQUISITE_FAILING`].
    pub prerequisite_failing: IntGaugeVec,
    /// See [`SLOT_FAILOVER`].
    pub slot_failover: IntGauge,
    /// See [`FAILOVER_STANDBYS`].
    pub failover_standbys: IntGauge,
    /// See [`FAILOVER_READY`].
    pub failover_ready: IntGauge,
    /// See [`PHYSICAL_STANDBYS`].
    pub physical_standbys: IntGauge,
    /// See [`HELD_BACK`].
    pub held_back: IntGauge,
    /// See [`PAYLOAD_MEMORY_BYTES`].
    pub payload_memory: IntGauge,
    /// See [`PAYLOAD_MEMORY_LIMIT_BYTES`].
    pub payload_memory_limit: IntGauge,
    /// Hot-path children, resolved once: attempts by outcome class.
    attempt_children: Vec<(&'static str, IntCounter)>,
    /// Changes and events by [`EventType::index`], deliveries by path.
    change_children: [IntCounter; 12],
    /// The twelve subscribable event types, then the four `<entity>.backfilled` ([`EventType::index`]).
    event_children: [IntCounter; 16],
    delivery_children: [IntCounter; 2],
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("metric names are unique");
            m
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid metric"));
        let fgauge = |name: &str, help: &str| reg(&registry, prometheus::Gauge::new(name, help).expect("valid metric"));
        let histogram = |name: &str, help: &str| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                    .expect("valid metric"),
            )
        };
        let changes = counter_vec(CHANGES_TOTAL, "Row changes decoded from the replication stream.", &["table", "op"]);
        let events = counter_vec(EVENTS_TOTAL, "Events routed to at least one endpoint.", &["event_type"]);
        let deliveries = counter_vec(DELIVERIES_TOTAL, "Deliveries created, by path.", &["path"]);
        let attempts = counter_vec(ATTEMPTS_TOTAL, "HTTP attempts by outcome class.", &["outcome"]);
        Metrics {
            attempt_children: ["2xx", "3xx", "4xx", "5xx", "timeout", "network", "refused", "local"]
                .into_iter()
                .map(|c| (c, attempts.with_label_values(&[c])))
                .collect(),
            change_children: EventType::ALL.map(|e| changes.with_label_values(&[e.table.name(), e.op.name()])),
            event_children: std::array::from_fn(|i| {
                let e =
                    EventType::ALL.get(i).copied().unwrap_or_else(|| EventType::BACKFILLED[i - EventType::ALL.len()]);
                events.with_label_values(&[e.name()])
            }),
            delivery_children: [deliveries.with_label_values(&["direct"]), deliveries.with_label_values(&["outbox"])],
            changes,
            events,
            deliveries,
            attempts,
            truncates: counter_vec(
                TRUNCATES_TOTAL,
                "TRUNCATEs of CRM tables seen (no events are sent for them).",
                &["table"],
            ),
            unroutable: counter_vec(
                UNROUTABLE_TOTAL,
                "Row changes without account_id in their image, not routed.",
                &["table"],
            ),
            slot_lag_bytes: gauge(
                SLOT_LAG_BYTES,
                "WAL bytes between the server's current position and the slot's confirmed position.",
            ),
            last_commit_age: fgauge(LAST_COMMIT_AGE_SECONDS, "Seconds since the last commit read from the stream."),
            streaming: gauge(STREAMING, "1 while the replication stream is open."),
            reconnects: reg(
                &registry,
                IntCounter::new(RECONNECTS_TOTAL, "Replication sessions re-established after a failure.")
                    .expect("valid metric"),
            ),
            failed: reg(
                &registry,
                IntCounter::new(FAILED_TOTAL, "Deliveries that failed after their last attempt.")
                    .expect("valid metric"),
            ),
            commit_to_delivered: histogram(
                COMMIT_TO_DELIVERED_SECONDS,
                "Seconds from the source commit to a 2xx answer.",
            ),
            request_duration: histogram(REQUEST_DURATION_SECONDS, "Seconds one HTTP attempt took."),
            in_flight: gauge(IN_FLIGHT_REQUESTS, "HTTP requests in flight."),
            pending: gauge(PENDING_DELIVERIES, "Deliveries waiting in the outbox."),
            oldest_pending_age: fgauge(
                OLDEST_PENDING_AGE_SECONDS,
                "Age in seconds of the oldest delivery waiting in the outbox for an active endpoint.",
            ),
            queued: gauge(QUEUED_DELIVERIES, "Deliveries waiting in memory for a free connection."),
            endpoints: reg(
                &registry,
                IntGaugeVec::new(Opts::new(ENDPOINTS, "Webhook endpoints by state."), &["state"])
                    .expect("valid metric"),
            ),
            endpoints_disabled: counter_vec(
                ENDPOINTS_DISABLED_TOTAL,
                "Endpoints disabled automatically, by reason.",
                &["reason"],
            ),
            api_requests: counter_vec(
                API_REQUESTS_TOTAL,
                "Admin API requests by route and HTTP status.",
                &["route", "status"],
            ),
            api_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(API_REQUEST_DURATION_SECONDS, "Admin API request duration.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            retention_deleted: counter_vec(RETENTION_DELETED_TOTAL, "Rows deleted by retention.", &["table"]),
            store_stalled: gauge(STORE_STALLED, "1 while the store writer cannot commit deliveries."),
            store_pinned: gauge(
                STORE_PINNED_RECORDS,
                "Delivery records the database refuses in every form; each holds the replication slot until stored.",
            ),
            store_set_aside: counter_vec(
                STORE_SET_ASIDE_TOTAL,
                "Store writes the database refused, by what was done with them.",
                &["form"],
            ),
            slot_lost: gauge(
                SLOT_LOST,
                "1 while the replication slot is missing or invalidated (run walhook slot-reset).",
            ),
            slot_failover: gauge(
                SLOT_FAILOVER,
                "1 when the replication slot is a failover slot (PostgreSQL 17+), carried by synchronising standbys.",
            ),
            failover_standbys: gauge(
                FAILOVER_STANDBYS,
                "Standby slots the primary names in synchronized_standby_slots.",
            ),
            failover_ready: gauge(
                FAILOVER_READY,
                "1 when the slot is a failover slot and every standby in synchronized_standby_slots is connected \
                 with the WAL up to the slot's confirmed position.",
            ),
            physical_standbys: gauge(PHYSICAL_STANDBYS, "Physical slots a standby streams from now."),
            held_back: gauge(
                HELD_BACK,
                "1 while the primary holds back every change from walhook for a standby slot named in \
                 synchronized_standby_slots that no standby streams from.",
            ),
            prerequisite_failing: {
                let g = reg(
                    &registry,
                    IntGaugeVec::new(
                        Opts::new(PREREQUISITE_FAILING, "1 while a replication prerequisite fails, by check."),
                        &["check"],
                    )
                    .expect("valid metric"),
                );
                for c in crate::pg::preflight::Check::ALL {
                    g.with_label_values(&[c.label()]).set(0);
                }
                g
            },
            payload_memory: gauge(
                PAYLOAD_MEMORY_BYTES,
                "Event payload bytes held in memory: waiting, in flight, or on their way to the store.",
            ),
            payload_memory_limit: gauge(PAYLOAD_MEMORY_LIMIT_BYTES, "dispatch.memory_limit, in bytes."),
            backfill_rows: reg(
                &registry,
                IntCounter::new(BACKFILL_ROWS_TOTAL, "Rows backfills sent (their chunk settled).")
                    .expect("valid metric"),
            ),
            backfill_chunks: {
                let c = counter_vec(BACKFILL_CHUNKS_TOTAL, "Backfill chunks, by outcome.", &["outcome"]);
                for outcome in ["sent", "retried"] {
                    c.with_label_values(&[outcome]);
                }
                c
            },
            backfills_running: gauge(BACKFILLS_RUNNING, "Backfills running."),
            registry,
        }
    }

    /// The attempts counter of an outcome class (see `Attempt::class`).
    pub fn attempt(&self, class: &str) -> &IntCounter {
        let found = self.attempt_children.iter().find(|(c, _)| *c == class);
        &found.unwrap_or(&self.attempt_children[6]).1
    }

    /// The changes counter of a row change: its table and op.
    pub fn change(&self, kind: EventType) -> &IntCounter {
        &self.change_children[kind.index()]
    }

    /// The events counter of an event type.
    pub fn event(&self, kind: EventType) -> &IntCounter {
        &self.event_children[kind.index()]
    }

    /// Deliveries created, sent directly (`true`) or through the outbox.
    pub fn delivery(&self, direct: bool) -> &IntCounter {
        &self.delivery_children[usize::from(!direct)]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Op, Table};

    fn value(m: &Metrics, series: &str) -> Option<String> {
        m.render().lines().find_map(|l| l.strip_prefix(series).map(|v| v.trim().to_owned()))
    }

    #[test]
    fn changes_and_events_count_under_their_labels() {
        let m = Metrics::new();
        m.change(EventType::new(Table::Activities, Op::Updated)).inc();
        m.change(EventType::new(Table::Projects, Op::Deleted)).inc();
        m.event(EventType::new(Table::Activities, Op::Updated)).inc();
        m.event(EventType::new(Table::Contacts, Op::Created)).inc();
        m.event(EventType::new(Table::Projects, Op::Backfilled)).inc();
        assert_eq!(value(&m, "walhook_events_total{event_type=\"project.backfilled\"}").as_deref(), Some("1"));
        assert_eq!(
            value(&m, "walhook_replication_changes_total{op=\"updated\",table=\"activities\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&m, "walhook_replication_changes_total{op=\"deleted\",table=\"projects\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&m, "walhook_replication_changes_total{op=\"created\",table=\"contacts\"}").as_deref(),
            Some("0")
        );
        assert_eq!(value(&m, "walhook_events_total{event_type=\"activity.updated\"}").as_deref(), Some("1"));
        assert_eq!(value(&m, "walhook_events_total{event_type=\"contact.created\"}").as_deref(), Some("1"));
        assert_eq!(value(&m, "walhook_events_total{event_type=\"project.deleted\"}").as_deref(), Some("0"));
        assert_eq!(m.render().matches("walhook_events_total{").count(), 16, "the twelve and the four backfilled");
        assert_eq!(m.render().matches("walhook_replication_changes_total{").count(), 12);
    }
}
