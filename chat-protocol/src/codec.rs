//! `tokio_util::codec` adapters over the pure [`frame`](crate::frame) functions, so the
//! async shells get buffered, back-pressured framing without re-implementing it.

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

use crate::deliver::SharedDeliver;
use crate::frame::{self, Check, FrameError, HEADER_LEN};
use crate::message::ServerMessage;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Decodes `In` frames and encodes `Out` frames, both bounded by `max_frame` body bytes.
#[derive(Debug)]
pub struct WireCodec<In, Out> {
    max_frame: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> WireCodec<In, Out> {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            _types: PhantomData,
        }
    }
}

impl<In: DeserializeOwned, Out> Decoder for WireCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match frame::check(src, self.max_frame)? {
            Check::Incomplete { needed } => {
                if let Some(needed) = needed {
                    src.reserve(needed.saturating_sub(src.len()));
                }
                Ok(None)
            }
            Check::Complete { body_len } => {
                let msg = frame::decode(&src[HEADER_LEN..HEADER_LEN + body_len]);
                src.advance(HEADER_LEN + body_len);
                Ok(Some(msg?))
            }
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for WireCodec<In, Out> {
    type Error = CodecError;

    /// Serializes `item` straight into `dst` behind its length prefix (no intermediate
    /// buffer). Errors as [`frame::encode_into`], leaving `dst` as it was.
    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame::encode_into(&item, self.max_frame, dst)?)
    }
}

/// A codec writing `ServerMessage`s also writes a [`SharedDeliver`]: the same bytes as
/// the `ServerMessage::Deliver` it stands for. (A sink with both item types needs the
/// item named for `flush` and `close`: `SinkExt::<ServerMessage>::flush(sink)`.)
impl<In, P: AsRef<[u8]>> Encoder<SharedDeliver<P>> for WireCodec<In, ServerMessage> {
    type Error = CodecError;

    fn encode(&mut self, item: SharedDeliver<P>, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(frame::encode_into(&item, self.max_frame, dst)?)
    }
}

frame::frame_buf!(BytesMut);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Username;
    use crate::message::ClientMessage;

    type ServerSide = WireCodec<ClientMessage, ServerMessage>;

    #[test]
    fn frames_are_appended_exactly_as_frame_encode_writes_them() {
        let mut codec = ServerSide::new(1024);
        let mut dst = BytesMut::from(&b"earlier"[..]);
        let ok = ServerMessage::Ok { id: 7 };
        let shared = SharedDeliver {
            envelope_id: 9,
            from: Username::parse("alice").unwrap(),
            payload: bytes::Bytes::from_static(&[5; 300]),
        };
        codec.encode(ok.clone(), &mut dst).unwrap();
        codec.encode(shared.clone(), &mut dst).unwrap();
        let mut expected = b"earlier".to_vec();
        frame::encode_into(&ok, 1024, &mut expected).unwrap();
        frame::encode_into(&ServerMessage::from(shared), 1024, &mut expected).unwrap();
        assert_eq!(&dst[..], &expected[..]);
    }

    #[test]
    fn an_oversized_frame_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut codec = ServerSide::new(100);
        let mut dst = BytesMut::from(&b"earlier"[..]);
        let big = SharedDeliver {
            envelope_id: 1,
            from: Username::parse("alice").unwrap(),
            payload: vec![0u8; 200],
        };
        let err = codec.encode(big, &mut dst).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Frame(FrameError::TooLarge { max: 100, .. })
            ),
            "{err:?}"
        );
        assert_eq!(&dst[..], b"earlier");
        // The codec still works after the refusal.
        codec.encode(ServerMessage::Ok { id: 1 }, &mut dst).unwrap();
        assert_eq!(
            dst.len(),
            7 + frame::encode(&ServerMessage::Ok { id: 1 }, 100)
                .unwrap()
                .len()
        );
    }
}
