//! Load shedding: while the relay is saturated it refuses a share of new sends with
//! `server_busy` (the client keeps them in its outbox and retries), so what it does accept
//! keeps a bounded delay instead of every message queueing behind the backlog.
//!
//! The signal is the relay's scheduling delay: how long a task that is ready to run
//! waits for a worker thread. [`monitor`] samples it every [`INTERVAL`] as the larger of
//! how late its timer fired (less the timer's 1 ms resolution) and how long a
//! `yield_now` took to come back (the task goes to the back of the run queue). A saturated
//! relay shows it in both; frames then wait in socket buffers for as long.
//!
//! The share refused comes from [`Controller`], the proportional-integral controller of
//! PIE (RFC 8033, §4.2) with the queueing delay replaced by this scheduling delay.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How often the scheduling delay is sampled and the shed probability updated.
pub const INTERVAL: Duration = Duration::from_millis(10);

/// Resolution of tokio's timer: a timer may fire this much late on an idle relay.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The highest share of sends refused: some always get through, so a sender is never
/// starved outright, and the delay they see keeps the controller honest.
pub const MAX_PROBABILITY: f64 = 0.99;

/// Per [`INTERVAL`] of time, the probability grows by `ALPHA × (delay − target) /
/// target`: a delay held at twice the target raises it by 0.25 per second.
const ALPHA: f64 = 0.0025;

/// Per update, the probability also grows by `BETA × (delay − previous delay) / target`:
/// a jump of the delay answers at once, as its fall does. Ten times `ALPHA`, as in
/// RFC 8033's defaults (α = 0.125, β = 1.25).
const BETA: f64 = 0.025;

/// Per [`INTERVAL`] while the delay stays under half the target, the probability decays
/// by this factor (RFC 8033, §4.2: "p = p * 0.98").
const DECAY: f64 = 0.98;

/// After a calm spell, how long a rising delay sheds nothing yet: a burst of work
/// shorter than this is absorbed, not refused. PIE's burst allowance (RFC 8033, §4.4:
/// 150 ms there, for a 15 ms target).
pub const BURST_ALLOWANCE: Duration = Duration::from_millis(50);

/// Below this probability nothing is shed while the last delay was under half the
/// target (RFC 8033, §4.1).
const LOW_PROBABILITY: f64 = 0.2;

/// PIE's drop-probability controller (RFC 8033, §4.2), sans-IO: feed it a delay sample
/// about every [`INTERVAL`] with the time since the last one (its gains scale with it);
/// it answers the share of sends to refuse now, in `0.0..=`
/// [`MAX_PROBABILITY`]. Like PIE it sheds nothing during a burst allowance after a calm
/// spell (§4.4), nor while the probability is low and the delay under half the target
/// (§4.1).
///
/// The gains are PIE's scaled to the target (PIE aims at 15 ms of queueing delay; the
/// relay at a few milliseconds of scheduling delay), and like PIE it decays the
/// probability by 2% per update once the delay is well under the target (§4.2,
/// "p = p * 0.98"). Unlike PIE, the probability never grows while the delay is under the
/// target.
#[derive(Debug, Clone)]
pub struct Controller {
    target: Duration,
    probability: f64,
    previous: Duration,
    /// Burst allowance left ([`BURST_ALLOWANCE`] after a calm spell).
    burst_left: Duration,
}

impl Controller {
    /// A controller aiming at `target` of scheduling delay (at least
    /// [`MIN_TARGET`]; a smaller one is raised to it).
    pub fn new(target: Duration) -> Self {
        Self {
            target: target.max(MIN_TARGET),
            probability: 0.0,
            previous: Duration::ZERO,
            burst_left: BURST_ALLOWANCE,
        }
    }

    /// Takes the delay sampled now and the time since the previous update; returns the
    /// share of sends to refuse until the next one.
    pub fn update(&mut self, delay: Duration, elapsed: Duration) -> f64 {
        let target = self.target.as_secs_f64();
        let (now, before) = (delay.as_secs_f64(), self.previous.as_secs_f64());
        // Updates come late exactly when the relay is saturated: the integral part and
        // the decay follow time, not the count of updates.
        let intervals = elapsed.as_secs_f64() / INTERVAL.as_secs_f64();
        let mut p = self.probability
            + intervals * ALPHA * (now - target) / target
            + BETA * (now - before) / target;
        if now < target {
            // Under the target the share never grows (a rising delay that is still
            // under it is no overload yet).
            p = p.min(self.probability);
        }
        let calm_delay = now < target / 2.0 && before < target / 2.0;
        if calm_delay {
            p *= DECAY.powf(intervals);
        }
        let calm = self.probability == 0.0 && calm_delay;
        self.probability = p.clamp(0.0, MAX_PROBABILITY);
        self.previous = delay;
        let allowed = !self.burst_left.is_zero();
        self.burst_left = if calm {
            BURST_ALLOWANCE
        } else {
            self.burst_left.saturating_sub(elapsed)
        };
        if allowed || (now < target / 2.0 && self.probability < LOW_PROBABILITY) {
            0.0
        } else {
            self.probability
        }
    }

    /// The controller's probability, which [`Controller::update`] answers once no burst
    /// allowance is left.
    pub fn probability(&self) -> f64 {
        self.probability
    }
}

/// The smallest delay target: the timer's resolution (a finer one cannot be measured).
pub const MIN_TARGET: Duration = TIMER_RESOLUTION;

/// The shed probability, shared by every connection: set by [`monitor`], read per send.
#[derive(Debug, Default)]
pub struct Shedder {
    /// The probability as a fraction of `u32::MAX`; 0 when the relay is not saturated.
    threshold: AtomicU32,
}

impl Shedder {
    /// Whether to refuse this send: true with the current probability.
    pub fn shed(&self) -> bool {
        let threshold = self.threshold.load(Ordering::Relaxed);
        threshold != 0 && rand::random::<u32>() < threshold
    }

    /// Sets the probability, `0.0..=1.0`.
    pub fn set(&self, probability: f64) {
        let threshold = (probability * f64::from(u32::MAX)) as u32;
        self.threshold.store(threshold, Ordering::Relaxed);
    }

    /// The share of sends refused now, `0.0..=1.0`.
    pub fn probability(&self) -> f64 {
        f64::from(self.threshold.load(Ordering::Relaxed)) / f64::from(u32::MAX)
    }
}

/// Samples the scheduling delay every [`INTERVAL`] and keeps `shedder` at the share the
/// controller (aiming at `target`) answers. Never returns. Must run as a task of its
/// own on the runtime's workers (`tokio::spawn`): off a worker thread `yield_now` comes
/// back at once and measures nothing.
pub async fn monitor(shedder: &Shedder, target: Duration) {
    let mut controller = Controller::new(target);
    let mut was_shedding = false;
    let mut last = Instant::now();
    loop {
        let due = Instant::now() + INTERVAL;
        tokio::time::sleep_until(due.into()).await;
        let late = Instant::now().saturating_duration_since(due);
        let yielded = Instant::now();
        tokio::task::yield_now().await;
        let queued = yielded.elapsed();
        let delay = queued.max(late.saturating_sub(TIMER_RESOLUTION));
        let now = Instant::now();
        shedder.set(controller.update(delay, now - last));
        last = now;
        // Logged as the controller's state changes, not each time the low-probability
        // rule lets an update through.
        let shedding = controller.probability() > 0.0;
        if shedding != was_shedding {
            if shedding {
                tracing::warn!(
                    "overloaded (scheduling delay {delay:?} against a target of {target:?}): \
                     refusing a share of new sends with server_busy"
                );
            } else {
                tracing::info!("no longer overloaded: accepting every send again");
            }
            was_shedding = shedding;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(2);

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    /// Updates in one second.
    const PER_SECOND: usize = 100;

    #[test]
    fn a_delay_under_the_target_sheds_nothing() {
        let mut c = Controller::new(TARGET);
        for i in 0..10 * PER_SECOND {
            // Jitter under the target, as an idle or lightly loaded relay shows.
            let p = c.update(ms((i % 7) as f64 * 0.25), INTERVAL);
            assert_eq!(p, 0.0, "update {i}");
        }
    }

    #[test]
    fn a_standing_delay_raises_the_share_until_it_is_nearly_all() {
        let mut c = Controller::new(TARGET);
        let mut last = 0.0;
        for i in 0..PER_SECOND {
            let shed = c.update(ms(10.0), INTERVAL);
            let p = c.probability();
            assert!(
                p >= last,
                "update {i}: {p} fell from {last} under a standing delay"
            );
            if i < (BURST_ALLOWANCE.as_millis() / INTERVAL.as_millis()) as usize {
                assert_eq!(shed, 0.0, "update {i}: within the burst allowance");
            } else {
                assert_eq!(shed, p, "update {i}: past the burst allowance");
            }
            last = p;
        }
        // Five times the target for one second: well past half refused.
        assert!(last > 0.5, "after 1 s at 10 ms: {last}");
        for _ in 0..10 * PER_SECOND {
            last = c.update(ms(10.0), INTERVAL);
        }
        assert_eq!(last, MAX_PROBABILITY);
    }

    #[test]
    fn a_jump_answers_at_once_and_its_fall_too() {
        let mut c = Controller::new(TARGET);
        let mut absorbed = Duration::ZERO;
        while absorbed <= BURST_ALLOWANCE {
            c.update(ms(5.0), INTERVAL);
            absorbed += INTERVAL;
        }
        // Past the burst allowance.
        let before = c.probability();
        let p = c.update(ms(30.0), INTERVAL);
        assert!(p > before + 0.3, "a 30 ms jump: {before} -> {p}");
        c.update(ms(0.1), INTERVAL);
        assert!(
            c.probability() < before + 0.05,
            "the delay gone again: {c:?}"
        );
    }

    #[test]
    fn a_late_update_counts_the_time_it_covers() {
        let (mut each, mut once) = (Controller::new(TARGET), Controller::new(TARGET));
        for c in [&mut each, &mut once] {
            c.update(ms(10.0), INTERVAL);
        }
        for _ in 0..4 {
            each.update(ms(10.0), INTERVAL);
        }
        once.update(ms(10.0), 4 * INTERVAL);
        let (a, b) = (each.probability(), once.probability());
        assert!(
            (a - b).abs() < 1e-9,
            "four updates {a}, one four times as late {b}"
        );
    }

    #[test]
    fn a_target_under_the_timer_resolution_is_raised_to_it() {
        let mut c = Controller::new(Duration::from_nanos(1));
        assert_eq!(c.update(ms(0.5), INTERVAL), 0.0);
        assert_eq!(c.probability(), 0.0);
    }

    #[test]
    fn a_short_burst_after_a_calm_spell_sheds_nothing() {
        let mut c = Controller::new(TARGET);
        for _ in 0..PER_SECOND {
            c.update(ms(0.2), INTERVAL);
        }
        for i in 0..3 {
            assert_eq!(c.update(ms(40.0), INTERVAL), 0.0, "burst update {i}");
        }
        for i in 0..PER_SECOND {
            assert_eq!(
                c.update(ms(0.2), INTERVAL),
                0.0,
                "after the burst, update {i}"
            );
        }
    }

    #[test]
    fn the_share_decays_to_nothing_once_the_delay_is_gone() {
        let mut c = Controller::new(TARGET);
        for _ in 0..2 * PER_SECOND {
            c.update(ms(20.0), INTERVAL);
        }
        assert_eq!(c.probability(), MAX_PROBABILITY);
        let mut updates = 0;
        loop {
            c.update(ms(0.2), INTERVAL);
            if c.probability() == 0.0 {
                break;
            }
            updates += 1;
            assert!(
                updates < 2 * PER_SECOND,
                "still shedding after 2 s without delay"
            );
        }
    }

    #[test]
    fn a_lone_spike_leaves_little_behind() {
        let mut c = Controller::new(TARGET);
        c.update(ms(0.2), INTERVAL);
        assert_eq!(
            c.update(ms(50.0), INTERVAL),
            0.0,
            "a lone spike is within the burst allowance"
        );
        for _ in 0..PER_SECOND / 10 {
            assert_eq!(c.update(ms(0.2), INTERVAL), 0.0);
        }
        assert!(
            c.probability() < 0.05,
            "100 ms after one 50 ms spike: {c:?}"
        );
    }

    #[test]
    fn the_shedder_refuses_about_its_share() {
        let s = Shedder::default();
        assert!(
            !(0..10_000).any(|_| s.shed()),
            "probability 0 refuses nothing"
        );
        s.set(0.5);
        let refused = (0..10_000).filter(|_| s.shed()).count();
        assert!(
            (4_000..6_000).contains(&refused),
            "{refused} of 10,000 at 0.5"
        );
        s.set(MAX_PROBABILITY);
        let refused = (0..10_000).filter(|_| s.shed()).count();
        assert!(
            refused > 9_700 && refused < 10_000,
            "{refused} at {MAX_PROBABILITY}"
        );
    }
}
