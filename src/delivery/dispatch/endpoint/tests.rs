//! The per-endpoint state machine, input by input: order per row, blocking, spill, probes,
//! disabling and removal.

use bytes::Bytes;

use super::*;
use crate::delivery::dispatch::limits::Limits;
use crate::model::delivery::Event;
use crate::model::event::{EventType, Op, Table};
use crate::model::position::Position;
use crate::security::secrets::SigningSecret;
use crate::security::sign::Signer;

const ROOMY: Bounds = Bounds { queue: 100, bytes: 1 << 20 };

fn endpoint(is_active: bool, auto_disabled: bool) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        id: Uuid::new_v4(),
        account_id: Uuid::new_v4(),
        url: "https://receiver.example/hook".parse().expect("a URL"),
        events: u16::MAX,
        is_active,
        auto_disabled,
        update_columns: None,
        signer: Signer::new(&SigningSecret::generate()).expect("a fresh secret"),
    })
}

/// An endpoint's state and a clock.
struct Fixture {
    ep: Arc<Endpoint>,
    state: EndpointState,
    now: Instant,
    seq: u32,
}

impl Fixture {
    fn new() -> Self {
        Self::spilled(false)
    }

    fn spilled(spilled: bool) -> Self {
        let ep = endpoint(true, false);
        let gate = Limits::new(100, 10, 100).gate(ep.id, ep.account_id);
        let now = Instant::now();
        Fixture { state: EndpointState::new(ep.clone(), gate, spilled, now), ep, now, seq: 0 }
    }

    /// A new delivery of row `key`.
    fn delivery(&mut self, key: &str) -> Delivery {
        self.seq += 1;
        let event = Event {
            id: Uuid::new_v4(),
            account_id: self.ep.account_id,
            event_type: EventType { table: Table::Contacts, op: Op::Updated },
            entity_key: key.to_owned(),
            position: Position { commit_lsn: 1, seq: self.seq },
            committed_at_us: 0,
            body: Bytes::from_static(b"{\"x\":1}"),
        };
        Delivery { id: Uuid::new_v4(), endpoint: self.ep.clone(), event: Arc::new(event), ticket: None }
    }

    /// Routes a delivery of row `key`; its id and what the state asked for.
    fn arrive(&mut self, key: &str, bounds: Bounds) -> (Uuid, Vec<Step>) {
        let d = self.delivery(key);
        let id = d.id;
        (id, steps(self.state.arrive(d, self.now, bounds)))
    }

    /// Starts the next ready delivery: its id.
    fn start(&mut self) -> Option<Uuid> {
        self.state.start_next().map(|d| d.id)
    }

    /// The first attempt of `id` finished and was recorded (`pending`: it waits in the outbox).
    fn settle(&mut self, id: Uuid, pending: bool) -> Vec<Step> {
        let (flight, removed, disabled) = self.state.finished(id, self.now).expect("in flight");
        assert!(!removed && !disabled && !flight.leased);
        steps(self.state.first_attempt_settled(&flight.delivery, pending))
    }
}

/// An action, by the delivery it concerns.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Spill(Uuid),
    StoreLeased(Uuid),
    FailUnsent(Uuid),
    Drop(Uuid),
    Pump,
}

fn steps(actions: Vec<Action>) -> Vec<Step> {
    (actions.into_iter())
        .map(|a| match a {
            Action::Spill(d) => Step::Spill(d.id),
            Action::StoreLeased(d) => Step::StoreLeased(d.id),
            Action::FailUnsent(d) => Step::FailUnsent(d.id),
            Action::Drop(d) => Step::Drop(d.id),
            Action::Pump => Step::Pump,
        })
        .collect()
}

fn answer(ep: &Endpoint, settled: Vec<Uuid>, endpoint_pending: Option<bool>) -> ProbeAnswer {
    ProbeAnswer { endpoint_id: ep.id, settled, endpoint_pending }
}

#[test]
fn a_row_waits_while_its_delivery_is_in_flight_and_others_do_not() {
    let mut f = Fixture::new();
    let (a1, s1) = f.arrive("contacts:a", ROOMY);
    let (a2, s2) = f.arrive("contacts:a", ROOMY);
    let (b1, s3) = f.arrive("contacts:b", ROOMY);
    assert_eq!([s1, s2, s3], [vec![Step::Pump], vec![Step::Pump], vec![Step::Pump]]);
    assert_eq!(f.start(), Some(a1));
    assert_eq!(f.start(), Some(b1), "another row is not held back");
    assert_eq!(f.start(), None, "the second delivery of row a waits behind the first");
    assert_eq!(f.state.waiting(), 1);
    assert_eq!(f.settle(a1, false), []);
    assert_eq!(f.start(), Some(a2), "it starts once the first has settled");
    assert_eq!(f.settle(a2, false), []);
    assert_eq!(f.settle(b1, false), []);
    assert!(f.state.idle());
}

#[test]
fn a_failed_first_attempt_blocks_its_row_until_the_outbox_settles_it() {
    let mut f = Fixture::new();
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    assert_eq!(f.start(), Some(a1));
    let (a2, _) = f.arrive("contacts:a", ROOMY);
    // a1 now waits in the outbox: a2 follows it there.
    assert_eq!(f.settle(a1, true), [Step::Spill(a2)]);
    assert_eq!(f.state.waiting(), 0);
    let (a3, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Spill(a3)], "later deliveries of a blocked row go to the outbox");
    let (b1, s) = f.arrive("contacts:b", ROOMY);
    assert_eq!(s, [Step::Pump]);
    assert_eq!(f.start(), Some(b1), "other rows continue");
    // The probe asks about the row's latest delivery in the outbox.
    let q = f.state.probe().expect("a blocked row is probed");
    assert_eq!(q, ProbeQuery { ids: vec![a3], whole_endpoint: false, known_rows: Vec::new() });
    assert_eq!(f.state.probe(), None, "one probe at a time");
    f.state.probe_answered(&answer(&f.ep, vec![a2], None));
    let (a4, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Spill(a4)], "still blocked: its latest is not settled");
    let q = f.state.probe().expect("probed again");
    assert_eq!(q.ids, [a4]);
    f.state.probe_answered(&answer(&f.ep, vec![a4], None));
    let (a5, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Pump], "unblocked once its latest has settled");
    assert_eq!(f.start(), Some(a5));
}

#[test]
fn a_full_queue_spills_the_endpoint_in_flight_under_the_lease() {
    let mut f = Fixture::new();
    let bounds = Bounds { queue: 2, bytes: 1 << 20 };
    let (a1, _) = f.arrive("contacts:a", bounds);
    assert_eq!(f.start(), Some(a1));
    let (b1, _) = f.arrive("contacts:b", bounds);
    let (c1, s) = f.arrive("contacts:c", bounds);
    assert_eq!(s, [Step::Pump]);
    let (d1, s) = f.arrive("contacts:d", bounds);
    assert_eq!(&s[..1], [Step::StoreLeased(a1)], "the attempt in flight is stored under the lease first");
    let mut spilled: Vec<Step> = s.into_iter().skip(1).collect();
    spilled.sort_by_key(|s| format!("{s:?}"));
    let mut expected = vec![Step::Spill(b1), Step::Spill(c1), Step::Spill(d1)];
    expected.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(spilled, expected, "what waits goes to the outbox");
    assert!(f.state.spilled());
    assert_eq!(f.state.waiting(), 0);
    let (e1, s) = f.arrive("contacts:e", bounds);
    assert_eq!(s, [Step::Spill(e1)], "new deliveries go to the outbox");
    // With an attempt in flight the probe asks about blocked rows only.
    assert!(!f.state.probe().expect("a spilled endpoint is probed").whole_endpoint);
    f.state.probe_answered(&answer(&f.ep, Vec::new(), None));
    let (flight, _, _) = f.state.finished(a1, f.now).expect("in flight");
    assert!(flight.leased, "its outcome completes the leased row");
    assert!(f.state.probe().expect("probed again").whole_endpoint);
}

#[test]
fn deliveries_waiting_too_long_spill_only_a_stuck_endpoint() {
    let mut f = Fixture::new();
    let spill_after = Duration::from_secs(1);
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    assert_eq!(f.start(), Some(a1));
    let (a2, _) = f.arrive("contacts:a", ROOMY);
    let later = f.now + Duration::from_secs(2);
    // An attempt finished a moment ago: the endpoint is busy, not stuck.
    f.now = later - Duration::from_millis(100);
    let (b1, _) = f.arrive("contacts:b", ROOMY);
    assert_eq!(f.start(), Some(b1));
    assert_eq!(f.settle(b1, false), []);
    assert_eq!(steps(f.state.spill_if_stuck(later, spill_after)), []);
    // Nothing finished for longer than spill_after while a2 waited that long: stuck.
    let much_later = later + Duration::from_secs(2);
    assert_eq!(steps(f.state.spill_if_stuck(much_later, spill_after)), [Step::StoreLeased(a1), Step::Spill(a2)]);
    assert!(f.state.spilled());
    assert_eq!(steps(f.state.spill_if_stuck(much_later, spill_after)), [], "spilled once");
}

#[test]
fn too_many_payload_bytes_waiting_spill_the_endpoint() {
    let mut f = Fixture::new();
    let bounds = Bounds { queue: 100, bytes: 10 };
    let (a1, s) = f.arrive("contacts:a", bounds);
    assert_eq!(s, [Step::Pump]);
    let (b1, s) = f.arrive("contacts:b", bounds);
    assert_eq!(s.len(), 2, "both bodies (7 bytes each) pass the share: {s:?}");
    assert!(s.contains(&Step::Spill(a1)) && s.contains(&Step::Spill(b1)));
    assert_eq!(f.state.waiting_bytes(), 0);
}

#[test]
fn too_many_blocked_rows_spill_the_endpoint() {
    let mut f = Fixture::new();
    for i in 0..MAX_BLOCKED_ROWS {
        let (id, _) = f.arrive(&format!("contacts:{i}"), ROOMY);
        assert_eq!(f.start(), Some(id));
        assert_eq!(f.settle(id, true), []);
        assert!(!f.state.spilled());
    }
    let (waiting, _) = f.arrive("contacts:w", ROOMY);
    let (last, _) = f.arrive("contacts:last", ROOMY);
    assert_eq!(f.start(), Some(waiting));
    assert_eq!(f.start(), Some(last));
    let (behind, _) = f.arrive("contacts:w", ROOMY);
    assert_eq!(f.settle(last, true), [Step::StoreLeased(waiting), Step::Spill(behind)], "one blocked row too many");
    assert!(f.state.spilled());
    assert_eq!(f.state.waiting(), 0);
}

#[test]
fn a_probe_finding_nothing_pending_unspills_but_blocked_rows_stay_blocked() {
    let mut f = Fixture::spilled(true);
    let (a1, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Spill(a1)], "an endpoint with deliveries in the outbox starts spilled");
    let q = f.state.probe().expect("a spilled endpoint is probed");
    assert_eq!(q, ProbeQuery { ids: vec![a1], whole_endpoint: true, known_rows: vec!["contacts:a".into()] });
    // Something of it outside the known rows is still pending: stays spilled.
    f.state.probe_answered(&answer(&f.ep, Vec::new(), Some(true)));
    assert!(f.state.spilled());
    let (b1, s) = f.arrive("contacts:b", ROOMY);
    assert_eq!(s, [Step::Spill(b1)]);
    f.state.probe().expect("probed again");
    f.state.probe_answered(&answer(&f.ep, vec![b1], Some(false)));
    assert!(!f.state.spilled(), "nothing pending outside the blocked rows: sends directly again");
    let (a2, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Spill(a2)], "row a is still blocked behind a1");
    let (b2, s) = f.arrive("contacts:b", ROOMY);
    assert_eq!(s, [Step::Pump], "row b settled: direct");
    assert_eq!(f.start(), Some(b2));
}

#[test]
fn a_requeue_while_a_probe_is_out_keeps_the_endpoint_spilled() {
    let mut f = Fixture::spilled(true);
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    f.state.probe().expect("probed");
    // webhooks-recover requeues deliveries after the probe's query ran: its "nothing pending"
    // answer predates them and must not unspill the endpoint.
    assert!(f.state.requeued().is_empty(), "already spilled: nothing to move");
    f.state.probe_answered(&answer(&f.ep, vec![a1], Some(false)));
    assert!(f.state.spilled(), "a probe answer older than the requeue cannot unspill");
    f.state.probe().expect("probed again");
    f.state.probe_answered(&answer(&f.ep, Vec::new(), Some(false)));
    assert!(!f.state.spilled(), "a probe sent after it can");
}

#[test]
fn after_a_requeue_no_row_is_accounted_for_until_nothing_is_pending() {
    // a1 in flight on the fast path when a delivery of row a is requeued (behind a1).
    let mut f = Fixture::new();
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    assert_eq!(f.start(), Some(a1));
    assert_eq!(steps(f.state.requeued()), [Step::StoreLeased(a1)], "the flight is stored under the lease");
    let (flight, _, _) = f.state.finished(a1, f.now).expect("in flight");
    assert!(flight.leased);
    // a1 settled first; row a is not accounted for by it: every pending delivery counts.
    let q = f.state.probe().expect("probed");
    assert_eq!(q, ProbeQuery { ids: Vec::new(), whole_endpoint: true, known_rows: Vec::new() });
    f.state.probe_answered(&answer(&f.ep, Vec::new(), Some(true)));
    assert!(f.state.spilled(), "the requeued delivery is pending");
    let (a2, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Spill(a2)], "row a's next change queues behind it");
    let q = f.state.probe().expect("probed again");
    assert_eq!(q.known_rows, ["contacts:a"], "a2 queues after the requeued delivery: its row is accounted for");
    f.state.probe_answered(&answer(&f.ep, vec![a2], Some(false)));
    assert!(!f.state.spilled(), "nothing pending: sends directly again");
}

#[test]
fn deliveries_spilled_untracked_since_the_probe_keep_the_endpoint_spilled() {
    let mut f = Fixture::spilled(true);
    for i in 0..MAX_BLOCKED_ROWS {
        f.arrive(&format!("contacts:{i}"), ROOMY);
    }
    f.state.probe().expect("probed");
    let (untracked, s) = f.arrive("contacts:one-too-many", ROOMY);
    assert_eq!(s, [Step::Spill(untracked)]);
    f.state.probe_answered(&answer(&f.ep, Vec::new(), Some(false)));
    assert!(f.state.spilled(), "a row the probe did not know about may be pending");
}

#[test]
fn a_removed_endpoint_drops_what_waits_and_lets_attempts_finish() {
    let mut f = Fixture::new();
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    assert_eq!(f.start(), Some(a1));
    let (a2, _) = f.arrive("contacts:a", ROOMY);
    assert_eq!(steps(f.state.removed()), [Step::Drop(a2)]);
    assert_eq!((f.state.waiting(), f.state.in_flight()), (0, 1));
    let (a3, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Drop(a3)], "routed before the delete arrived");
    let (_, removed, _) = f.state.finished(a1, f.now).expect("in flight");
    assert!(removed, "its outcome is not recorded");
}

#[test]
fn a_disabled_endpoint_fails_what_waits_until_it_is_enabled_again() {
    let mut f = Fixture::new();
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    assert_eq!(f.start(), Some(a1));
    let (a2, _) = f.arrive("contacts:a", ROOMY);
    let (b1, _) = f.arrive("contacts:b", ROOMY);
    let (gone, fail_pending) =
        f.state.changed(Arc::new(Endpoint { auto_disabled: true, is_active: false, ..clone(&f.ep) }));
    assert!(fail_pending, "rows stored after the disable fail too");
    let mut gone = steps(gone);
    gone.sort_by_key(|s| format!("{s:?}"));
    let mut expected = vec![Step::FailUnsent(a2), Step::FailUnsent(b1)];
    expected.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(gone, expected);
    let (a3, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::FailUnsent(a3)]);
    let (_, _, disabled) = f.state.finished(a1, f.now).expect("in flight");
    assert!(disabled);
    let (s, _) = f.state.changed(Arc::new(clone(&f.ep)));
    assert_eq!(steps(s), [], "enabled again");
    let (_, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Pump]);
}

#[test]
fn an_endpoint_paused_by_hand_keeps_what_waits_in_the_outbox() {
    let mut f = Fixture::new();
    let (a1, _) = f.arrive("contacts:a", ROOMY);
    let (paused, fail_pending) = f.state.changed(Arc::new(Endpoint { is_active: false, ..clone(&f.ep) }));
    assert!(!fail_pending);
    assert_eq!(steps(paused), [Step::Spill(a1)]);
    let (a2, s) = f.arrive("contacts:a", ROOMY);
    assert_eq!(s, [Step::Spill(a2)]);
}

fn clone(ep: &Endpoint) -> Endpoint {
    Endpoint {
        id: ep.id,
        account_id: ep.account_id,
        url: ep.url.clone(),
        events: ep.events,
        is_active: true,
        auto_disabled: false,
        update_columns: None,
        signer: ep.signer.clone(),
    }
}
