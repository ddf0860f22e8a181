//! The writer thread's loop: plain writes in order, held envelopes at their deadline
//! unless acknowledged, barriers passed once both are behind them, each batch one
//! transaction.

use std::time::{Duration, Instant};

use super::*;

/// Plain writes go in submission order as soon as the writer gets to them; held
/// envelopes once their grace is over, unless acknowledged meanwhile. A plain write never
/// waits behind a held one: held envelopes only ever reach live sessions, which do not
/// read them back from the store, and a new session's barrier waits for them. But an
/// envelope for a recipient with earlier envelopes still held (its session went away or
/// fell behind, so later ones take the store) has those claimed into the batch ahead of
/// it, unacknowledged and before their grace is over: written first, a held one refused
/// (the recipient's queue past its slack) holds the later ones of the same connection
/// (`crate::fence`) instead of being overtaken by them.
pub(super) fn run(store: &Store, queue: &Queue, grace: Duration) {
    // Highest envelope id seen, written or not: recorded so ids are not handed out twice.
    let mut last_id = 0;
    loop {
        let mut batch = Vec::new();
        {
            let mut state = lock(&queue.state);
            loop {
                while batch.len() < MAX_BATCH {
                    let Some(w) = state.plain.pop_front() else {
                        break;
                    };
                    match w {
                        // Passes after this batch's commit, once its held envelopes are done.
                        Write {
                            op: Op::Barrier { held_before },
                            reply: Some(reply),
                            ..
                        } => state.barriers.push((held_before, reply)),
                        w => {
                            if let Op::Enqueue { id, envelope } = &w.op
                                && state.held_for.contains_key(&envelope.recipient)
                            {
                                let (before, to) = (*id, envelope.recipient.clone());
                                claim_held_before(
                                    &mut state,
                                    &to,
                                    before,
                                    &mut batch,
                                    &mut last_id,
                                );
                            }
                            batch.push(w);
                        }
                    }
                }
                let stopping = state.stopping;
                while batch.len() < MAX_BATCH {
                    let due = state.held_queue.front().is_some_and(|(_, w)| {
                        stopping || w.held_since.is_some_and(|t| t.elapsed() >= grace)
                    });
                    let acked = state.held_queue.front().is_some_and(|(_, w)| {
                        matches!(w.op, Op::Enqueue { id, .. } if !state.held.contains_key(&id))
                    });
                    if !due && !acked {
                        break;
                    }
                    let Some((_, mut w)) = state.held_queue.pop_front() else {
                        break;
                    };
                    if let Op::Enqueue { id, .. } = w.op {
                        last_id = last_id.max(id);
                        // Claimed now, or acknowledged meanwhile and never written.
                        if let Some(h) = state.take_held(id) {
                            w.reply = Some(h.reply);
                            w._room = Some(h.room);
                            batch.push(w);
                        }
                    }
                }
                if !batch.is_empty() {
                    break;
                }
                pass_barriers(&mut state);
                if stopping && state.plain.is_empty() && state.held_queue.is_empty() {
                    return;
                }
                let deadline = state.held_queue.front().and_then(|(_, w)| w.held_since);
                state = match deadline {
                    Some(since) => {
                        let wait = (since + grace).saturating_duration_since(Instant::now());
                        queue
                            .work
                            .wait_timeout(state, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => queue.work.wait(state).unwrap_or_else(|p| p.into_inner()),
                };
            }
        }
        write_batch(store, batch, last_id);
        pass_barriers(&mut lock(&queue.state));
    }
}

/// Moves the envelopes held for `recipient` with ids below `before` (so routed before
/// it) into `batch`, in id order, to be written now whatever their grace; `last_id`
/// records their ids, as for any held envelope the writer passes.
fn claim_held_before(
    state: &mut QueueState,
    recipient: &Username,
    before: u64,
    batch: &mut Vec<Write>,
    last_id: &mut u64,
) {
    let mut i = 0;
    while i < state.held_queue.len() && state.held_for.contains_key(recipient) {
        let claim = matches!(
            &state.held_queue[i].1.op,
            Op::Enqueue { id, envelope }
                if *id < before && envelope.recipient == *recipient && state.held.contains_key(id)
        );
        if !claim {
            i += 1;
            continue;
        }
        let Some((_, mut w)) = state.held_queue.remove(i) else {
            break;
        };
        if let Op::Enqueue { id, .. } = w.op
            && let Some(h) = state.take_held(id)
        {
            *last_id = (*last_id).max(id);
            w.reply = Some(h.reply);
            w._room = Some(h.room);
            batch.push(w);
        }
    }
}

/// Answers the barriers none of whose held envelopes is still waiting.
fn pass_barriers(state: &mut QueueState) {
    if state.barriers.is_empty() {
        return;
    }
    // Acknowledged envelopes may still sit in the queue: they are done.
    let held = &state.held;
    let oldest = state
        .held_queue
        .iter()
        .find(|(_, w)| matches!(w.op, Op::Enqueue { id, .. } if held.contains_key(&id)))
        .map_or(u64::MAX, |(seq, _)| *seq);
    let (passed, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.barriers)
        .into_iter()
        .partition(|(before, _)| *before <= oldest);
    state.barriers = waiting;
    for (_, reply) in passed {
        let _ = reply.send(Ok(Done::Passed));
    }
}

/// One transaction for the batch; if it fails, write by write, so one bad write cannot
/// fail the others.
fn write_batch(store: &Store, batch: Vec<Write>, last_id: u64) {
    let together = store.transaction(|tx| {
        let results = batch
            .iter()
            .map(|w| w.apply(tx))
            .collect::<Result<Vec<_>, _>>()?;
        store::record_last_id(tx, last_id)?;
        Ok(results)
    });
    match together {
        Ok(results) => {
            for (w, r) in batch.into_iter().zip(results) {
                w.reply(Ok(r));
            }
        }
        Err(_) => {
            for w in batch {
                let one = store.transaction(|tx| w.apply(tx));
                w.reply(one);
            }
        }
    }
}
