//! `tokio_util::codec` adapters over the pure [`frame`](crate::frame) functions, so the
//! async shells get buffered, back-pressured framing without re-implementing it.

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{self, Check, FrameError, HEADER_LEN};

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

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame::encode(&item, self.max_frame)?);
        Ok(())
    }
}
