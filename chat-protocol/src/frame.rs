//! Framing: `u32` big-endian body length, then the postcard-encoded message.
//!
//! Decoding is check-then-parse over a byte slice: [`check`] says whether a whole frame is
//! buffered (or that the declared length is over the limit, before anything is allocated),
//! then [`decode`] turns the body into a message. Neither panics on any input.

use serde::{Serialize, de::DeserializeOwned};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default maximum body size of one frame (64 KiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The declared or actual body length is over the negotiated maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The body is not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Where a buffered frame stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// More bytes are needed; `needed` is the total frame length when known.
    Incomplete { needed: Option<usize> },
    /// A whole frame is buffered: header plus `body_len` bytes.
    Complete { body_len: usize },
}

/// Looks at the start of `buf` and says whether a whole frame of at most `max` body bytes
/// is there. Rejects an oversized length prefix as soon as the prefix is read.
pub fn check(buf: &[u8], max: usize) -> Result<Check, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(Check::Incomplete { needed: None });
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() - HEADER_LEN < len {
        return Ok(Check::Incomplete {
            needed: Some(HEADER_LEN + len),
        });
    }
    Ok(Check::Complete { body_len: len })
}

/// Decodes one message body (without the length prefix). Trailing bytes are an error so
/// that a body has exactly one meaning.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Parses one whole frame from the start of `buf`: `Ok(None)` while incomplete, otherwise
/// the message and the number of bytes it used.
pub fn parse<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    match check(buf, max)? {
        Check::Incomplete { .. } => Ok(None),
        Check::Complete { body_len } => {
            let msg = decode(&buf[HEADER_LEN..HEADER_LEN + body_len])?;
            Ok(Some((msg, HEADER_LEN + body_len)))
        }
    }
}

/// A growable byte buffer frames are appended to: `Vec<u8>`, and `BytesMut` with the
/// `codec` feature.
pub trait FrameBuf {
    /// Bytes in the buffer.
    fn filled(&self) -> usize;
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);
    /// Drops everything after the first `len` bytes.
    fn cut_to(&mut self, len: usize);
    /// The buffer's bytes, to patch.
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// Implements [`FrameBuf`] for a type with `len`, `extend_from_slice`, `truncate` and
/// `DerefMut<Target = [u8]>` (`Vec<u8>`, `BytesMut`).
macro_rules! frame_buf {
    ($buf:ty) => {
        impl $crate::frame::FrameBuf for $buf {
            fn filled(&self) -> usize {
                self.len()
            }

            fn put(&mut self, bytes: &[u8]) {
                self.extend_from_slice(bytes);
            }

            fn cut_to(&mut self, len: usize) {
                self.truncate(len);
            }

            fn bytes_mut(&mut self) -> &mut [u8] {
                self
            }
        }
    };
}
#[cfg(feature = "codec")]
pub(crate) use frame_buf;

frame_buf!(Vec<u8>);

/// Postcard output appending to a [`FrameBuf`], slices copied whole.
struct Append<'a, B>(&'a mut B);

impl<B: FrameBuf> postcard::ser_flavors::Flavor for Append<'_, B> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.put(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put(&[data]);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends one frame carrying `msg` to `out`, serialized in place behind its length
/// prefix (no intermediate buffer). Fails, leaving `out` as it was, when the body would
/// be over `max` (`TooLarge`) or `msg` cannot be serialized (`Malformed`).
pub fn encode_into<T: Serialize + ?Sized, B: FrameBuf>(
    msg: &T,
    max: usize,
    out: &mut B,
) -> Result<(), FrameError> {
    let start = out.filled();
    out.put(&[0; HEADER_LEN]);
    if let Err(e) = postcard::serialize_with_flavor(msg, Append(out)) {
        out.cut_to(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let len = out.filled() - start - HEADER_LEN;
    if len > max {
        out.cut_to(start);
        return Err(FrameError::TooLarge { len, max });
    }
    out.bytes_mut()[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// One frame carrying `msg`, as a new buffer.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(msg, max, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ClientMessage, ServerMessage};
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_length_prefix() {
        let msg = ClientMessage::Ping { nonce: 7 };
        let bytes = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
        let body_len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(body_len, bytes.len() - HEADER_LEN);
        let (back, used) = parse::<ClientMessage>(&bytes, DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn incomplete_until_last_byte() {
        let bytes = encode(&ClientMessage::Ping { nonce: 1 }, 100).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(
                parse::<ClientMessage>(&bytes[..cut], 100),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_prefix_rejected_before_body_arrives() {
        let buf = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            check(&buf, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            })
        );
        let one_over = ((DEFAULT_MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            check(&one_over, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
        let at_limit = (DEFAULT_MAX_FRAME as u32).to_be_bytes();
        assert_eq!(
            check(&at_limit, DEFAULT_MAX_FRAME),
            Ok(Check::Incomplete {
                needed: Some(DEFAULT_MAX_FRAME + HEADER_LEN)
            })
        );
    }

    #[test]
    fn encode_refuses_oversized_body_and_keeps_buffer() {
        let msg = ClientMessage::Send {
            id: 1,
            to: "bob".into(),
            payload: vec![0; 200],
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode_into(&msg, 100, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out, vec![1, 2, 3]);
    }

    /// Serializes part of itself, then fails.
    struct FailsHalfway;

    impl Serialize for FailsHalfway {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{Error, SerializeTuple};
            let mut t = s.serialize_tuple(2)?;
            t.serialize_element("written before the failure")?;
            let _ = t;
            Err(S::Error::custom("refused halfway"))
        }
    }

    #[test]
    fn a_message_that_fails_to_serialize_leaves_the_buffer_as_it_was() {
        let mut out = vec![1, 2, 3];
        let err = encode_into(&FailsHalfway, 100, &mut out).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut body = postcard::to_allocvec(&ClientMessage::Ping { nonce: 1 }).unwrap();
        body.push(0);
        assert!(matches!(
            decode::<ClientMessage>(&body),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = Vec::new();
        for nonce in 0..3 {
            encode_into(&ServerMessage::Pong { nonce }, 100, &mut buf).unwrap();
        }
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((msg, used)) = parse::<ServerMessage>(&buf[at..], 100).unwrap() {
            seen.push(msg);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            seen,
            (0..3)
                .map(|nonce| ServerMessage::Pong { nonce })
                .collect::<Vec<_>>()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse::<ClientMessage>(&bytes, DEFAULT_MAX_FRAME);
            let _ = parse::<ServerMessage>(&bytes, DEFAULT_MAX_FRAME);
            let _ = decode::<ClientMessage>(&bytes);
            let _ = decode::<ServerMessage>(&bytes);
        }

        #[test]
        fn framed_garbage_is_an_error_or_a_message(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = (body.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&body);
            match parse::<ClientMessage>(&buf, DEFAULT_MAX_FRAME) {
                Ok(Some((_, used))) => prop_assert_eq!(used, buf.len()),
                Ok(None) => prop_assert!(false, "a whole frame was reported incomplete"),
                Err(FrameError::Malformed(_)) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }

        #[test]
        fn truncated_valid_frames_are_incomplete(
            to in "[a-z]{1,32}", payload in proptest::collection::vec(any::<u8>(), 0..300), id: u32, cut: usize
        ) {
            let bytes = encode(&ClientMessage::Send { id, to, payload }, DEFAULT_MAX_FRAME).unwrap();
            let cut = cut % bytes.len();
            prop_assert_eq!(parse::<ClientMessage>(&bytes[..cut], DEFAULT_MAX_FRAME), Ok(None));
        }

        #[test]
        fn messages_round_trip(nonce: u64, id: u32, to in "\\PC{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            for msg in [ClientMessage::Ping { nonce }, ClientMessage::Send { id, to: to.clone(), payload: payload.clone() }] {
                let bytes = encode(&msg, DEFAULT_MAX_FRAME).unwrap();
                prop_assert_eq!(parse::<ClientMessage>(&bytes, DEFAULT_MAX_FRAME).unwrap().unwrap().0, msg);
            }
        }
    }
}
