use super::*;

#[test]
fn burst_then_paced() {
    let t0 = Instant::now();
    let mut bucket = TokenBucket::new(
        RateLimit {
            per_second: 10.0,
            burst: 3.0,
        },
        t0,
    );
    assert!((0..3).all(|_| bucket.take(t0).is_zero()));
    // Over the burst: each request waits one more tenth of a second.
    assert_eq!(bucket.take(t0), Duration::from_millis(100));
    assert_eq!(bucket.take(t0), Duration::from_millis(200));
    // Time repays the debt, then refills, but only up to the burst.
    let t1 = t0 + Duration::from_millis(500);
    assert!(bucket.take(t1).is_zero());
    let t2 = t1 + Duration::from_secs(60);
    assert_eq!((0..10).filter(|_| bucket.take(t2).is_zero()).count(), 3);
}

#[test]
fn work_charges_size_and_ids_not_frames() {
    let t0 = Instant::now();
    let limit = RateLimit {
        per_second: 100.0,
        burst: 200.0,
    };
    // A 64 KiB Ack with 65,000 ids costs what 250+ small frames cost.
    let flood = work::frame(65_536, 65_000);
    assert!(flood > 250.0, "{flood}");
    let mut bucket = TokenBucket::new(limit, t0);
    assert!(bucket.take_n(flood, t0) >= Duration::from_millis(500));
    // A small message costs little more than one token.
    assert!(work::frame(300, 0) < 1.5);
}

#[test]
fn addresses_are_limited_apart_and_v6_by_slash_64() {
    let t0 = Instant::now();
    let limiter = AddressLimiter::new(RateLimit {
        per_second: 1.0,
        burst: 2.0,
    });
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "192.0.2.2".parse().unwrap();
    assert!(limiter.check(a, t0).is_ok() && limiter.check(a, t0).is_ok());
    assert!(limiter.check(a, t0).is_err());
    assert!(limiter.check(b, t0).is_ok(), "another address has its own");
    assert!(
        limiter.check(a, t0 + Duration::from_secs(1)).is_ok(),
        "refilled"
    );
    let v6a: IpAddr = "2001:db8::1".parse().unwrap();
    let v6b: IpAddr = "2001:db8::ffff".parse().unwrap();
    assert_eq!(AddressKey::of(v6a), AddressKey::of(v6b), "same /64");
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
    assert_eq!(AddressKey::of(mapped), AddressKey::of(a));
}

#[test]
fn sources_group_addresses_like_address_keys_and_are_never_zero() {
    let sources = Sources::default();
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "192.0.2.2".parse().unwrap();
    let v6a: IpAddr = "2001:db8::1".parse().unwrap();
    let v6b: IpAddr = "2001:db8::2".parse().unwrap();
    assert_eq!(sources.of(a), sources.of(a));
    assert_ne!(sources.of(a), sources.of(b));
    assert_eq!(sources.of(v6a), sources.of(v6b), "one /64, one source");
    assert!([a, b, v6a].iter().all(|ip| sources.of(*ip) != 0));
    assert_ne!(
        Sources::default().of(a),
        sources.of(a),
        "each start draws a new key"
    );
}

#[test]
fn pre_login_slots_per_address_and_in_all() {
    let slots = PreLoginSlots::new(3, 2);
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "192.0.2.2".parse().unwrap();
    let s1 = slots.take(a).unwrap();
    let _s2 = slots.take(a).unwrap();
    assert_eq!(slots.take(a).unwrap_err(), NoSlot::AddressFull);
    let _s3 = slots.take(b).unwrap();
    assert_eq!(slots.take(b).unwrap_err(), NoSlot::Full);
    assert_eq!(slots.in_use(), 3);
    drop(s1);
    assert!(slots.take(a).is_ok(), "given back");
}

/// The field case: every slot held by a few busy addresses, and a newcomer still gets
/// in, by taking the oldest slot of the busiest address (which is told).
#[test]
fn a_full_budget_makes_room_for_a_less_busy_address() {
    let slots = PreLoginSlots::new(4, 2);
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "192.0.2.2".parse().unwrap();
    let c: IpAddr = "192.0.2.3".parse().unwrap();
    let a1 = slots.take(a).unwrap();
    let a2 = slots.take(a).unwrap();
    let d: IpAddr = "192.0.2.4".parse().unwrap();
    let _b1 = slots.take(b).unwrap();
    let _d1 = slots.take(d).unwrap();
    let c1 = slots.take(c).expect("a newcomer gets in");
    assert_eq!(slots.in_use(), 4, "still within the budget");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), a1.evicted())
            .await
            .expect("a's oldest was told");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), a2.evicted())
                .await
                .is_err(),
            "only one was evicted"
        );
    });
    // Everyone holds 1 now: evicting would not be fairer.
    assert_eq!(slots.take(c).unwrap_err(), NoSlot::Full);
    assert_eq!(slots.take(b).unwrap_err(), NoSlot::Full);
    // The evicted one's drop gives nothing back twice.
    drop(a1);
    assert_eq!(slots.in_use(), 4);
    drop(c1);
    assert_eq!(slots.in_use(), 3);
    assert!(slots.take(c).is_ok());
    drop(a2);
}

#[test]
fn a_shared_bucket_refills_on_wall_clock_time_and_survives_its_text_form() {
    let limit = RateLimit {
        per_second: 1.0 / 180.0, // 20 an hour
        burst: 2.0,
    };
    let t0 = 1_700_000_000_000;
    let one = SharedBucket::take(None, limit, t0).unwrap();
    let stored = SharedBucket::parse(one.encode().as_bytes()).unwrap();
    assert_eq!(stored, one);
    let two = SharedBucket::take(Some(stored), limit, t0 + 10).unwrap();
    let wait = SharedBucket::take(Some(two), limit, t0 + 20).unwrap_err();
    assert!(
        wait > Duration::from_secs(170) && wait <= Duration::from_secs(180),
        "{wait:?}"
    );
    // Three minutes later one more; a clock behind the stored time refills nothing.
    let three = SharedBucket::take(Some(two), limit, t0 + 190_000).unwrap();
    assert!(SharedBucket::take(Some(three), limit, t0).is_err());
    // Never more than the burst, however long it was idle.
    let idle = SharedBucket::take(Some(three), limit, t0 + 1_000_000_000).unwrap();
    assert_eq!(idle.tokens, 1.0);
    for bad in ["", "x 1", "1", "NaN 5", "inf 5", "1 -1"] {
        assert_eq!(SharedBucket::parse(bad.as_bytes()), None, "{bad:?}");
    }
}

#[test]
fn a_token_given_back_is_there_again_up_to_the_burst() {
    let limit = RateLimit {
        per_second: 1.0 / 180.0,
        burst: 2.0,
    };
    // Shared: taken twice, one given back: one more may be taken, then none.
    let t0 = 1_700_000_000_000;
    let one = SharedBucket::take(None, limit, t0).unwrap();
    let empty = SharedBucket::take(Some(one), limit, t0).unwrap();
    let back = SharedBucket::give_back(Some(empty), limit, t0);
    let again = SharedBucket::take(Some(back), limit, t0).unwrap();
    assert!(SharedBucket::take(Some(again), limit, t0).is_err());
    // Never past the burst; nothing stored is full.
    assert_eq!(SharedBucket::give_back(Some(one), limit, t0).tokens, 2.0);
    assert_eq!(SharedBucket::give_back(None, limit, t0).tokens, 2.0);
    // Per relay, per address.
    let limiter = AddressLimiter::new(limit);
    let (a, b): (IpAddr, IpAddr) = (
        "198.51.100.1".parse().unwrap(),
        "203.0.113.9".parse().unwrap(),
    );
    let now = Instant::now();
    limiter.check(a, now).unwrap();
    limiter.check(a, now).unwrap();
    assert!(limiter.check(a, now).is_err());
    limiter.refund(b, now);
    assert!(limiter.check(a, now).is_err(), "another address's refund");
    limiter.refund(a, now);
    limiter.refund(a, now);
    limiter.refund(a, now);
    limiter.check(a, now).unwrap();
    limiter.check(a, now).unwrap();
    assert!(limiter.check(a, now).is_err(), "refunds past the burst");
}

#[test]
fn shared_address_names_hide_the_address_and_group_like_the_local_limiter() {
    let secret = [7u8; 32];
    let a: IpAddr = "203.0.113.9".parse().unwrap();
    let name = shared_address_name(&secret, a);
    assert_eq!(name.len(), 32);
    assert!(!name.contains("203"));
    assert_eq!(name, shared_address_name(&secret, a), "stable");
    assert_ne!(name, shared_address_name(&[8u8; 32], a), "keyed");
    let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
    assert_eq!(
        shared_address_name(&secret, v6a),
        shared_address_name(&secret, v6b),
        "one /64"
    );
}
