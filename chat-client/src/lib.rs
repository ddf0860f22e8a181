//! Secure Chat client: the engine behind the desktop GUI and the headless mode.
