//! Sealing what was stored in the clear, when a store that did not encrypt does now (a
//! passphrase given to an identity that had none, or a store older than encryption at
//! rest): every value of every sealed column, texts and keys alike, in one transaction.

use rusqlite::params_from_iter;
use rusqlite::types::Value;

use super::StoreError;
use super::cipher::{self, MAGIC, OVERHEAD, RowCipher};

/// A column whose values are sealed at rest: its table, the columns whose values its
/// place ([`cipher::place`], the associated data) lists, in that order, and the columns
/// that name one row (the same, unless the place names less than a row). Each table's own
/// code builds the same places (`body_place`, `state_place`, `group_place`, `keys_place`,
/// `line_place`, `held_change_place`, `outbox_place`); a test reads every kind back through
/// the store after sealing.
struct SealedColumn {
    table: &'static str,
    column: &'static str,
    row: &'static [&'static str],
    key: &'static [&'static str],
}

impl SealedColumn {
    /// A column whose place names one row.
    const fn by_row(
        table: &'static str,
        column: &'static str,
        row: &'static [&'static str],
    ) -> Self {
        Self {
            table,
            column,
            row,
            key: row,
        }
    }
}

/// Every column the store seals when it encrypts.
const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn::by_row("messages", "body", &["peer", "id", "outgoing"]),
    SealedColumn::by_row("outbox", "body", &["id"]),
    SealedColumn::by_row("e2e_state", "inbound", &["peer"]),
    SealedColumn::by_row("groups", "membership", &["id"]),
    SealedColumn::by_row("groups", "sender_key", &["id"]),
    SealedColumn::by_row("group_member_keys", "keys", &["group_id", "member"]),
    SealedColumn::by_row("group_messages", "body", &["group_id", "sender", "id"]),
    SealedColumn {
        table: "group_changes_held",
        column: "change",
        row: &["group_id", "sender"],
        key: &["seq"],
    },
];

/// A row-naming value as a part of a place: text and blobs as their bytes, an integer
/// (only `messages.outgoing`, 0 or 1) as one byte.
fn place_part(value: &Value) -> Vec<u8> {
    match value {
        Value::Text(text) => text.as_bytes().to_vec(),
        Value::Blob(bytes) => bytes.clone(),
        Value::Integer(n) => vec![*n as u8],
        Value::Real(_) | Value::Null => Vec::new(),
    }
}

/// Seals every value of the sealed columns stored in the clear: a TEXT, or a BLOB that
/// does not start with the sealed prefix (the test `read_blob` applies). Returns how many
/// were sealed. Call only with `cipher.encrypt` set.
pub(super) fn seal_plain_values(
    tx: &rusqlite::Transaction<'_>,
    cipher: &RowCipher,
) -> Result<usize, StoreError> {
    let mut sealed = 0;
    for c in SEALED_COLUMNS {
        let (table, column) = (c.table, c.column);
        let select = format!(
            "SELECT {key}, {row}, {column} FROM {table}
             WHERE typeof({column}) = 'text'
                OR (typeof({column}) = 'blob'
                    AND (length({column}) < {OVERHEAD} OR substr({column}, 1, {magic}) != ?1))",
            key = c.key.join(", "),
            row = c.row.join(", "),
            magic = MAGIC.len(),
        );
        let rows: Vec<Vec<Value>> = tx
            .prepare(&select)?
            .query_map([&MAGIC[..]], |r| {
                (0..=c.key.len() + c.row.len())
                    .map(|i| r.get::<_, Value>(i))
                    .collect()
            })?
            .collect::<Result<_, _>>()?;
        let update = format!(
            "UPDATE {table} SET {column} = ?1 WHERE {}",
            c.key
                .iter()
                .enumerate()
                .map(|(i, name)| format!("{name} = ?{}", i + 2))
                .collect::<Vec<_>>()
                .join(" AND ")
        );
        let mut update = tx.prepare(&update)?;
        for mut values in rows {
            let plain = match values.pop() {
                Some(Value::Text(text)) => zeroize::Zeroizing::new(text.into_bytes()),
                Some(Value::Blob(bytes)) => zeroize::Zeroizing::new(bytes),
                _ => continue,
            };
            let place_values = values.split_off(c.key.len());
            let parts: Vec<Vec<u8>> = place_values.iter().map(place_part).collect();
            let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let place = cipher::place(table, column, &parts);
            let Some(value) = cipher.seal(&place, &plain) else {
                return Ok(sealed);
            };
            update.execute(params_from_iter(
                std::iter::once(Value::Blob(value)).chain(values),
            ))?;
            sealed += 1;
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use chat_protocol::e2e::{Body, Inbound};
    use rusqlite::Connection;

    use super::super::tests::{on_disk, open};
    use super::super::{OutboxItem, ReceivedText, Store};
    use super::*;

    /// A store written without a passphrase, opened with one: every value of every sealed
    /// column is sealed at once (nothing plain left on disk while it is open), and what
    /// the store reads back through its own code (at its own places) is what was written.
    #[test]
    fn every_plain_value_is_sealed_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = open(dir.path(), false);
            let text = ReceivedText {
                peer: "bob",
                id: &[1; 16],
                text: "PLAIN-received",
                sent_at: 5,
                stored_at: 6,
            };
            store.commit_text(text, &Inbound::default(), None).unwrap();
            for (n, body) in [
                (2, Body::Text("PLAIN-queued".into())),
                (
                    3,
                    Body::Receipt {
                        epoch: 7,
                        ids: vec![[9; 16]],
                    },
                ),
            ] {
                let item = OutboxItem {
                    id: [n; 16],
                    peer: "bob".into(),
                    body,
                    sent_at: 10,
                };
                store.enqueue(&item).unwrap();
            }
        }
        // The group tables as a client without a passphrase filled them (their values'
        // formats do not matter to sealing; the client tests read real ones back).
        Connection::open(dir.path().join(Store::FILE_NAME))
            .unwrap()
            .execute_batch(
                "INSERT INTO groups (id, membership, sender_key)
                     VALUES (x'0a', x'504c41494e2d6d656d62657273686970', x'504c41494e2d73656e6465722d6b6579');
                 INSERT INTO groups (id, membership) VALUES (x'0b', x'504c41494e2d6d656d6265727368697032');
                 INSERT INTO group_member_keys (group_id, member, keys)
                     VALUES (x'0a', 'bob', x'504c41494e2d6d656d6265722d6b657973');
                 INSERT INTO group_messages (group_id, sender, id, outgoing, body, sent_at, stored_at, status)
                     VALUES (x'0a', 'bob', x'01', 0, 'PLAIN-group-text', 1, 2, 'delivered');
                 INSERT INTO group_changes_held (group_id, sender, change, received_at)
                     VALUES (x'0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a', 'bob', x'504c41494e2d68656c642d6368616e6765', 3);",
            )
            .unwrap();
        let store = open(dir.path(), true);
        for plain in [
            "PLAIN-received",
            "PLAIN-queued",
            "PLAIN-membership",
            "PLAIN-sender-key",
            "PLAIN-member-keys",
            "PLAIN-group-text",
            "PLAIN-held-change",
        ] {
            assert!(!on_disk(dir.path(), plain.as_bytes()), "{plain} left plain");
        }
        for c in SEALED_COLUMNS {
            let (plain, all): (i64, i64) = store
                .conn
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FILTER (WHERE substr({col}, 1, 3) != ?1
                                                 OR typeof({col}) != 'blob'),
                                COUNT(*)
                         FROM {table} WHERE {col} IS NOT NULL",
                        col = c.column,
                        table = c.table
                    ),
                    [&MAGIC[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(plain, 0, "{}.{}", c.table, c.column);
            assert!(all > 0, "{}.{} had a value to seal", c.table, c.column);
        }
        // Read back through the store: its places and ours agree.
        let history = store.history("bob", 10).unwrap();
        let texts: Vec<&str> = history.iter().map(|h| h.text.as_str()).collect();
        assert_eq!(texts, ["PLAIN-received", "PLAIN-queued"]);
        let queued = store.outbox_queued().unwrap();
        assert_eq!(queued[0].body, Body::Text("PLAIN-queued".into()));
        assert_eq!(
            queued[1].body,
            Body::Receipt {
                epoch: 7,
                ids: vec![[9; 16]]
            }
        );
        assert_eq!(store.inbound_state("bob").unwrap().epochs().count(), 0);
        // The held change opens at its place (and, not being a real change, is dropped).
        assert!(store.held_changes(&[0x0a; 16]).unwrap().is_empty());
        drop(store);
        // Opened again: nothing is left to seal, and nothing is sealed twice.
        let store = open(dir.path(), true);
        let again: Vec<String> = store
            .history("bob", 10)
            .unwrap()
            .into_iter()
            .map(|h| h.text)
            .collect();
        assert_eq!(again, texts);
    }
}
