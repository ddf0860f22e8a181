use super::*;

fn with_id(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    headers
}

#[test]
fn a_ring_is_awaited_until_its_envelope_is_given_or_its_patience_runs_out() {
    let start = Instant::now();
    let mut rings = Rings::default();
    assert_eq!(rings.awaiting(start), Awaiting::None);
    rings.rung(Some(&with_id("a")), start);
    rings.rung(Some(&with_id("b")), start);
    assert_eq!(rings.awaiting(start), Awaiting::Some);
    // Another publish's envelope (a duplicate's, an earlier one's) answers neither.
    rings.stored(&with_id("z"));
    assert_eq!(rings.awaiting(start), Awaiting::Some);
    rings.stored(&with_id("a"));
    assert_eq!(rings.awaiting(start), Awaiting::Some, "b is still awaited");
    rings.stored(&with_id("b"));
    assert_eq!(rings.awaiting(start), Awaiting::None);
    // One the stream refused (or stores late) lapses after RING_PATIENCE, said once.
    rings.rung(Some(&with_id("refused")), start);
    let almost = start + RING_PATIENCE - Duration::from_millis(1);
    assert_eq!(rings.awaiting(almost), Awaiting::Some);
    assert_eq!(rings.awaiting(start + RING_PATIENCE), Awaiting::Lapsed);
    assert_eq!(rings.awaiting(start + RING_PATIENCE), Awaiting::None);
}

#[test]
fn a_ring_without_an_id_or_past_the_kept_count_is_answered_by_any_envelope() {
    let start = Instant::now();
    let mut rings = Rings::default();
    rings.rung(None, start);
    assert_eq!(rings.awaiting(start), Awaiting::Some);
    rings.stored(&HeaderMap::new());
    assert_eq!(rings.awaiting(start), Awaiting::None);
    for i in 0..RINGS_KEPT {
        rings.rung(Some(&with_id(&i.to_string())), start);
    }
    assert!(rings.unnamed.is_none());
    rings.rung(Some(&with_id("one too many")), start);
    assert_eq!(rings.awaited.len(), RINGS_KEPT, "the map stays bounded");
    assert!(rings.unnamed.is_some());
    // Hostile ids never grow it either, and all expire.
    for i in 0..10 * RINGS_KEPT {
        rings.rung(Some(&with_id(&format!("x{i}"))), start);
    }
    assert_eq!(rings.awaited.len(), RINGS_KEPT);
    assert_eq!(rings.awaiting(start + RING_PATIENCE), Awaiting::Lapsed);
    assert!(rings.awaited.is_empty());
}

#[test]
fn a_waiting_reader_checks_at_once_after_settling_then_spread_around_the_period() {
    let start = Instant::now();
    let mut checks = Checks::new(start);
    assert_eq!(checks.due(), start);
    checks.checked(start, 0.0);
    assert_eq!(checks.due(), start + BELL_SETTLE);
    let settled = start + BELL_SETTLE;
    checks.checked(settled, 0.0);
    assert_eq!(checks.due(), settled + IDLE_CHECK.mul_f64(0.75));
    checks.checked(settled, 0.999);
    assert!(checks.due() > settled + IDLE_CHECK.mul_f64(1.24));
    assert!(checks.due() < settled + IDLE_CHECK.mul_f64(1.25));
    // Out-of-range jitter stays within the quarter.
    checks.checked(settled, 7.0);
    assert_eq!(checks.due(), settled + IDLE_CHECK.mul_f64(1.25));
}

#[test]
fn failed_checks_back_off_to_half_a_minute_and_a_success_resets_the_backoff() {
    let start = Instant::now();
    let mut checks = Checks::new(start);
    let mut waits = Vec::new();
    for _ in 0..7 {
        checks.failed(start);
        waits.push(checks.due() - start);
    }
    let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
    checks.checked(start, 0.5);
    checks.failed(start);
    assert_eq!(checks.due(), start + CHECK_RETRY);
}

#[test]
fn a_disturbance_makes_a_check_due_at_once_and_settles_again() {
    let start = Instant::now();
    let mut checks = Checks::new(start);
    checks.checked(start, 0.0);
    checks.checked(start, 0.0);
    let later = start + Duration::from_secs(3);
    checks.disturbed(later);
    assert_eq!(checks.due(), later);
    checks.checked(later, 0.0);
    assert_eq!(checks.due(), later + BELL_SETTLE);
}

#[test]
fn a_reader_is_busy_at_busy_after_envelopes_within_the_window_only() {
    let start = Instant::now();
    let mut pace = Pace::new(start);
    // Spread out: never busy.
    for i in 0..10 * BUSY_AFTER as u32 {
        assert!(!pace.given(start + BUSY_WINDOW * i));
    }
    let mut pace = Pace::new(start);
    for _ in 1..BUSY_AFTER {
        assert!(!pace.given(start));
    }
    assert!(pace.given(start + BUSY_WINDOW / 2));
}
