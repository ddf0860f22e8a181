//! Secure Chat protocol: everything both ends must agree on, with no I/O.
//!
//! - [`frame`]: length-prefixed framing (u32 big-endian length + postcard body) and the
//!   pure decoder that never panics on any input.
//! - [`message`]: the messages a client and the relay exchange, with request ids and
//!   typed error codes; [`deliver`]: a `Deliver` encoded from shared parts.
//! - [`username`]: the account-name rules (charset, length, case-insensitive identity).
//! - [`auth`]: the login challenge transcript and RSA-PSS-SHA256 proof of key possession.
//! - [`identity`]: long-term RSA identities, fingerprints, key files, derived keys.
//! - [`e2e`]: envelopes, key offers, epochs and retry requests (end-to-end encryption).
//! - [`group`]: group membership chains, sender keys and group envelopes.
//! - [`safety`]: safety numbers to compare out of band.
//! - [`primitives`]: the RSA and AES-GCM calls all of the above go through.
//! - [`trust`]: trust on first use: pins, key changes, verification.
//! - [`relay_id`]: relay addresses `HOST:PORT#FINGERPRINT` and relay key fingerprints.
//! - `codec` (feature `codec`): `tokio_util` adapters over [`frame`], for the async shells.
//! - `tls` (feature `tls`): the TLS 1.3 configurations: relay identity, key-pinning
//!   verifier, channel binding.
//!
//! Nothing here opens a socket, reads the clock or uses a global RNG: callers pass
//! randomness and time in, so every path is a deterministic unit test.

pub mod auth;
#[cfg(feature = "codec")]
pub mod codec;
pub mod deliver;
pub mod e2e;
pub mod frame;
pub mod group;
pub mod identity;
pub mod message;
pub mod primitives;
pub mod relay_id;
pub mod safety;
#[cfg(feature = "tls")]
pub mod tls;
pub mod trust;
pub mod username;

pub use frame::{DEFAULT_MAX_FRAME, FrameError};
pub use message::{ClientMessage, ErrorCode, ServerMessage};
pub use username::{Username, UsernameError};

/// Wire protocol version carried in every `Hello`. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 8;

/// Default TCP port of the relay.
pub const DEFAULT_PORT: u16 = 65432;
