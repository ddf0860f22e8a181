//! A `Deliver` built from shared parts, for a relay that hands one payload to several
//! owners (the recipient's queue, the envelope waiting for its `Ack`, the store) without
//! copying it.

use serde::ser::{Serialize, SerializeStructVariant, Serializer};

use crate::Username;
use crate::message::ServerMessage;

/// Index of `Deliver` among [`ServerMessage`]'s variants: postcard writes it (a varint)
/// before the fields. The tests below fail if the enum's order changes.
const DELIVER_VARIANT: u32 = 6;

/// A [`ServerMessage::Deliver`] whose sender name and payload are shared rather than
/// owned. It serializes to exactly the same bytes (so the `codec` feature's `WireCodec`
/// writing `ServerMessage`s writes it too); `P` is any byte container, e.g.
/// `bytes::Bytes`, whose clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDeliver<P> {
    /// The envelope's id: increasing per relay, the recipient's `Ack` names it.
    pub envelope_id: u64,
    /// The sender, stamped from its authenticated session.
    pub from: Username,
    /// The opaque payload (ciphertext), as the sender sent it.
    pub payload: P,
}

impl<P: AsRef<[u8]>> Serialize for SharedDeliver<P> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut variant =
            serializer.serialize_struct_variant("ServerMessage", DELIVER_VARIANT, "Deliver", 3)?;
        variant.serialize_field("envelope_id", &self.envelope_id)?;
        variant.serialize_field("from", self.from.as_str())?;
        variant.serialize_field("payload", serde_bytes::Bytes::new(self.payload.as_ref()))?;
        variant.end()
    }
}

impl<P: AsRef<[u8]>> From<SharedDeliver<P>> for ServerMessage {
    /// The owned message (copies the name and the payload).
    fn from(d: SharedDeliver<P>) -> Self {
        ServerMessage::Deliver {
            envelope_id: d.envelope_id,
            from: d.from.to_string(),
            payload: d.payload.as_ref().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, DEFAULT_MAX_FRAME};
    use proptest::prelude::*;

    proptest! {
        /// Same bytes as the owned message, and they decode back to it.
        #[test]
        fn encodes_exactly_as_the_owned_deliver(
            envelope_id in any::<u64>(),
            name in "[a-z][a-z0-9_]{0,31}",
            payload in proptest::collection::vec(any::<u8>(), 0..20_000),
        ) {
            let shared = SharedDeliver {
                envelope_id,
                from: Username::parse(&name).unwrap(),
                payload: payload.clone(),
            };
            let owned = ServerMessage::from(shared.clone());
            let bytes = frame::encode(&shared, DEFAULT_MAX_FRAME).unwrap();
            prop_assert_eq!(&bytes, &frame::encode(&owned, DEFAULT_MAX_FRAME).unwrap());
            let (back, used) = frame::parse::<ServerMessage>(&bytes, DEFAULT_MAX_FRAME)
                .unwrap()
                .unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, ServerMessage::Deliver { envelope_id, from: name, payload });
        }
    }
}
