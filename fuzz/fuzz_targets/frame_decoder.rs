//! Arbitrary bytes into the frame decoder and both message decoders: errors, never panics;
//! whatever decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use chat_protocol::frame::{self, DEFAULT_MAX_FRAME};
use chat_protocol::{ClientMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = frame::parse::<ClientMessage>(data, DEFAULT_MAX_FRAME) {
        assert!(used <= data.len());
        let again = frame::encode(&msg, DEFAULT_MAX_FRAME).expect("a decoded message re-encodes");
        let (back, _) = frame::parse::<ClientMessage>(&again, DEFAULT_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    let _ = frame::parse::<ServerMessage>(data, DEFAULT_MAX_FRAME);
    let _ = frame::decode::<ClientMessage>(data);
    let _ = frame::decode::<ServerMessage>(data);
});
