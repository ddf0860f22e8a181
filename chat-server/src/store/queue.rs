//! The store-and-forward queue: envelopes not yet acknowledged by their recipient, with
//! the accounting its quotas need.
//!
//! `usage` holds, per (recipient, sender), the envelopes and bytes queued;
//! `source_usage` the same per (recipient, source) — a source being the sender's address
//! group as a keyed hash, see `limits::Sources` — and, with recipient `''`, per source over
//! all recipients; the `counters` rows `queued_envelopes` / `queued_bytes` hold the totals.
//! All change in the same transaction as the queue, so a quota check costs a few index
//! lookups, not a scan.

use std::collections::HashMap;
use std::rc::Rc;

use chat_protocol::Username;
use rusqlite::types::Value;
use rusqlite::{OptionalExtension, params};

use super::StoreError;

/// Bounds of the queue, per recipient, per (recipient, sender) and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_envelopes: u64,
    pub max_bytes: u64,
    /// What one sender — and, separately, one source address — may hold of one
    /// recipient's queue.
    pub max_sender_envelopes: u64,
    pub max_sender_bytes: u64,
    /// Bytes queued for everyone together.
    pub max_total_bytes: u64,
    /// Bytes one source address may have queued, for all recipients together.
    pub max_source_bytes: u64,
}

impl QueueLimits {
    /// The bounds for an envelope already delivered to its online recipient and written
    /// only because its `Ack` came later than `queue.live_grace_secs`: the recipient has
    /// it, so its mailbox may pass its bound by `slack_envelopes` (and `slack_bytes`), and
    /// one sender's share does not apply; the relay-wide bounds (`max_total_bytes`, one
    /// address's bytes) do. Refusing it `recipient_queue_full` would tell the sender a
    /// message the recipient is reading did not go, and have it sent again.
    ///
    /// The slack is bounded (the relay passes its per-session queue length) because a
    /// mailbox left past the bound by a recipient that stalled is the next session's
    /// backlog, which that session must be able to take without being closed for not
    /// acknowledging (`max_unacked` counts the bound plus this slack).
    #[must_use]
    pub fn delivered(self, slack_envelopes: u64, slack_bytes: u64) -> Self {
        let max_envelopes = self.max_envelopes.saturating_add(slack_envelopes);
        let max_bytes = self.max_bytes.saturating_add(slack_bytes);
        Self {
            max_envelopes,
            max_bytes,
            max_sender_envelopes: max_envelopes,
            max_sender_bytes: max_bytes,
            ..self
        }
    }

    /// No bound but the per-recipient ones (for tests and tools).
    pub fn per_recipient(max_envelopes: u64, max_bytes: u64) -> Self {
        Self {
            max_envelopes,
            max_bytes,
            max_sender_envelopes: max_envelopes,
            max_sender_bytes: max_bytes,
            max_total_bytes: u64::MAX,
            max_source_bytes: u64::MAX,
        }
    }
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Stored(u64),
    /// The recipient's queue is at its bound.
    Full,
    /// This sender (or its source address) holds its whole share of the recipient's queue.
    SenderShareFull,
    /// This source address holds its whole share of the server's queue.
    SourceFull,
    /// The queue of the whole server is at its bound (or the disk is full).
    ServerFull,
    UnknownRecipient,
    /// Never stored: refused before the store because the relay was saturated (see
    /// [`crate::overload`]) or the connection's pipeline or the store writer was full
    /// (`shed_when_full`); answered `server_busy` with `why` as its text, then a `Ping`
    /// with `fence`, the nonce whose `Pong` lifts the connection's shed fence.
    Shed {
        fence: u64,
        why: &'static str,
    },
    /// Never stored: an earlier send of the same connection to the same recipient was
    /// refused, and the client had not yet answered the `Ping` behind that refusal when
    /// it sent this one (`crate::fence`); answered `server_busy`.
    Fenced,
}

/// One queued envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    pub sender: String,
    pub payload: Vec<u8>,
}

fn counter(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<u64, StoreError> {
    Ok(tx
        .prepare_cached("SELECT value FROM counters WHERE name = ?1")?
        .query_row(params![name], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0)
        .unsigned_abs())
}

pub(crate) fn add_counter(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    delta: i64,
) -> Result<(), StoreError> {
    if delta != 0 {
        tx.prepare_cached(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = MAX(0, value + excluded.value)",
        )?
        .execute(params![name, delta])?;
    }
    Ok(())
}

/// A usage table: (table, key column) — `usage` per (recipient, sender), `source_usage`
/// per (recipient, source), where recipient `''` stands for everyone.
type Usage = (&'static str, &'static str);
const BY_SENDER: Usage = ("usage", "sender");
const BY_SOURCE: Usage = ("source_usage", "source");

/// Adds `envelopes` and `bytes` (negative: removes) to what `key` holds of `recipient`'s
/// queue in `usage`; a row that reaches zero envelopes goes.
fn add_usage(
    tx: &rusqlite::Transaction<'_>,
    (table, column): Usage,
    recipient: &str,
    key: &dyn rusqlite::ToSql,
    envelopes: i64,
    bytes: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(&format!(
        "INSERT INTO {table} (recipient, {column}, envelopes, bytes) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (recipient, {column}) DO UPDATE SET
             envelopes = MAX(0, envelopes + excluded.envelopes),
             bytes = MAX(0, bytes + excluded.bytes)"
    ))?
    .execute(params![recipient, key, envelopes, bytes])?;
    tx.prepare_cached(&format!(
        "DELETE FROM {table} WHERE recipient = ?1 AND {column} = ?2 AND envelopes = 0"
    ))?
    .execute(params![recipient, key])?;
    Ok(())
}

/// What `key` holds of `recipient`'s queue in `usage`: (envelopes, bytes).
fn held(
    tx: &rusqlite::Transaction<'_>,
    (table, column): Usage,
    recipient: &str,
    key: &dyn rusqlite::ToSql,
) -> Result<(u64, u64), StoreError> {
    let (envelopes, bytes): (i64, i64) = tx
        .prepare_cached(&format!(
            "SELECT envelopes, bytes FROM {table} WHERE recipient = ?1 AND {column} = ?2"
        ))?
        .query_row(params![recipient, key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, 0));
    Ok((envelopes.unsigned_abs(), bytes.unsigned_abs()))
}

/// Adds `envelopes` and `bytes` (negative: removes) to what `sender` (from `source`)
/// holds for `recipient` and to the totals.
fn account(
    tx: &rusqlite::Transaction<'_>,
    recipient: &str,
    sender: &str,
    source: i64,
    envelopes: i64,
    bytes: i64,
) -> Result<(), StoreError> {
    add_usage(tx, BY_SOURCE, recipient, &source, envelopes, bytes)?;
    add_usage(tx, BY_SOURCE, "", &source, envelopes, bytes)?;
    add_usage(tx, BY_SENDER, recipient, &sender, envelopes, bytes)?;
    add_counter(tx, "queued_envelopes", envelopes)?;
    add_counter(tx, "queued_bytes", bytes)
}

/// A deleted envelope, as accounted: (recipient, sender, source, bytes).
type Deleted = (String, String, i64, i64);

/// What the `DELETE … RETURNING` statements below return, in [`Deleted`]'s order.
const RETURNING: &str = "RETURNING recipient, sender, source, LENGTH(payload)";

fn deleted_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Deleted> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

/// Accounts for deleted rows.
fn unaccount(
    tx: &rusqlite::Transaction<'_>,
    rows: impl IntoIterator<Item = Deleted>,
) -> Result<usize, StoreError> {
    let mut per: HashMap<(String, String, i64), (i64, i64)> = HashMap::new();
    let mut n = 0;
    for (recipient, sender, source, bytes) in rows {
        let e = per.entry((recipient, sender, source)).or_default();
        e.0 += 1;
        e.1 += bytes;
        n += 1;
    }
    for ((recipient, sender, source), (envelopes, bytes)) in per {
        account(tx, &recipient, &sender, source, -envelopes, -bytes)?;
    }
    Ok(n)
}

/// Queues `payload` for a registered `recipient` from `sender` at `source` (its address
/// group's keyed hash) unless that would pass `limits`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn enqueue_in(
    tx: &rusqlite::Transaction<'_>,
    id: Option<u64>,
    recipient: &Username,
    sender: &Username,
    source: i64,
    payload: &[u8],
    now_secs: u64,
    limits: &QueueLimits,
) -> Result<Enqueued, StoreError> {
    let registered: bool = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM accounts WHERE username = ?1)")?
        .query_row(params![recipient.as_str()], |r| r.get(0))?;
    if !registered {
        return Ok(Enqueued::UnknownRecipient);
    }
    let len = payload.len() as u64;
    if counter(tx, "queued_bytes")? + len > limits.max_total_bytes {
        return Ok(Enqueued::ServerFull);
    }
    if held(tx, BY_SOURCE, "", &source)?.1 + len > limits.max_source_bytes {
        return Ok(Enqueued::SourceFull);
    }
    let (count, bytes): (i64, i64) = tx
        .prepare_cached(
            "SELECT COALESCE(SUM(envelopes), 0), COALESCE(SUM(bytes), 0)
             FROM usage WHERE recipient = ?1",
        )?
        .query_row(params![recipient.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if count.unsigned_abs() >= limits.max_envelopes || bytes.unsigned_abs() + len > limits.max_bytes
    {
        return Ok(Enqueued::Full);
    }
    let over = |(envelopes, bytes): (u64, u64)| {
        envelopes >= limits.max_sender_envelopes || bytes + len > limits.max_sender_bytes
    };
    if over(held(tx, BY_SENDER, recipient.as_str(), &sender.as_str())?)
        || over(held(tx, BY_SOURCE, recipient.as_str(), &source)?)
    {
        return Ok(Enqueued::SenderShareFull);
    }
    // NULL lets SQLite pick the id; the relay passes its own so it can deliver first.
    tx.prepare_cached(
        "INSERT INTO queue (id, recipient, sender, source, payload, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id.map(|id| id as i64),
        recipient.as_str(),
        sender.as_str(),
        source,
        payload,
        now_secs as i64
    ])?;
    let stored = tx.last_insert_rowid().unsigned_abs();
    account(
        tx,
        recipient.as_str(),
        sender.as_str(),
        source,
        1,
        len as i64,
    )?;
    Ok(Enqueued::Stored(stored))
}

/// Deletes `recipient`'s envelopes `ids` (others' ids are ignored) in one statement.
/// Returns how many were deleted.
pub(crate) fn ack_in(
    tx: &rusqlite::Transaction<'_>,
    recipient: &Username,
    ids: &[u64],
) -> Result<usize, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = Rc::new(
        ids.iter()
            .map(|&id| Value::from(id as i64))
            .collect::<Vec<_>>(),
    );
    let deleted: Vec<Deleted> = tx
        .prepare_cached(&format!(
            "DELETE FROM queue WHERE recipient = ?1 AND id IN rarray(?2) {RETURNING}"
        ))?
        .query_map(params![recipient.as_str(), ids], deleted_row)?
        .collect::<Result<_, _>>()?;
    unaccount(tx, deleted)
}

/// Deletes envelopes older than `max_age_secs`; returns how many.
pub(crate) fn purge_in(
    tx: &rusqlite::Transaction<'_>,
    now_secs: u64,
    max_age_secs: u64,
) -> Result<usize, StoreError> {
    let cutoff = now_secs.saturating_sub(max_age_secs) as i64;
    let deleted: Vec<Deleted> = tx
        .prepare(&format!(
            "DELETE FROM queue WHERE created_at < ?1 {RETURNING}"
        ))?
        .query_map(params![cutoff], deleted_row)?
        .collect::<Result<_, _>>()?;
    let removed = unaccount(tx, deleted)?;
    add_counter(tx, "expired", removed as i64)?;
    Ok(removed)
}

/// Deletes everything queued for `recipient`.
pub(crate) fn drop_queue_in(
    tx: &rusqlite::Transaction<'_>,
    recipient: &Username,
) -> Result<usize, StoreError> {
    let deleted: Vec<Deleted> = tx
        .prepare(&format!(
            "DELETE FROM queue WHERE recipient = ?1 {RETURNING}"
        ))?
        .query_map(params![recipient.as_str()], deleted_row)?
        .collect::<Result<_, _>>()?;
    unaccount(tx, deleted)
}

/// Rebuilds the accounting from the queue itself (after an upgrade).
pub(crate) fn rebuild_usage_in(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(
        "DELETE FROM usage;
         INSERT INTO usage (recipient, sender, envelopes, bytes)
             SELECT recipient, sender, COUNT(*), SUM(LENGTH(payload)) FROM queue
             GROUP BY recipient, sender;
         DELETE FROM source_usage;
         INSERT INTO source_usage (recipient, source, envelopes, bytes)
             SELECT recipient, source, COUNT(*), SUM(LENGTH(payload)) FROM queue
             GROUP BY recipient, source;
         INSERT INTO source_usage (recipient, source, envelopes, bytes)
             SELECT '', source, COUNT(*), SUM(LENGTH(payload)) FROM queue GROUP BY source;
         INSERT INTO counters (name, value)
             SELECT 'queued_envelopes', COUNT(*) FROM queue WHERE true
             ON CONFLICT (name) DO UPDATE SET value = excluded.value;
         INSERT INTO counters (name, value)
             SELECT 'queued_bytes', COALESCE(SUM(LENGTH(payload)), 0) FROM queue WHERE true
             ON CONFLICT (name) DO UPDATE SET value = excluded.value;",
    )?;
    Ok(())
}

/// Remembers that ids up to `id` were handed out, even those never written.
pub(crate) fn record_last_id(tx: &rusqlite::Transaction<'_>, id: u64) -> Result<(), StoreError> {
    let updated = tx
        .prepare_cached("UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'queue'")?
        .execute(params![id as i64])?;
    if updated == 0 {
        // No envelope was ever inserted, so SQLite has no row for the table yet.
        tx.prepare_cached("INSERT INTO sqlite_sequence (name, seq) VALUES ('queue', ?1)")?
            .execute(params![id as i64])?;
    }
    Ok(())
}
