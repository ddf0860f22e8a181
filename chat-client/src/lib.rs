//! Secure Chat client: the engine behind the desktop GUI and the headless mode.
//!
//! - [`api`]: commands in, events out — the only interface front ends use.
//! - [`engine`]: the background task owning connection, identity, E2E state and store.
//! - [`net`]: connect, Hello and challenge-response login.
//! - [`store`]: SQLite: pinned keys, history, outbox.
//! - [`home`]: the home directory: settings (RON) and the identity key file.
//! - [`headless`]: the JSON-lines front end for scripts.
//! - [`gui`]: the desktop window (eframe/egui).

pub mod api;
pub mod engine;
pub mod gui;
pub mod headless;
pub mod home;
pub mod known_relays;
pub mod net;
pub mod store;

pub use api::{Command, ConnectionState, Event};
pub use engine::{ClientConfig, ClientHandle, spawn};
