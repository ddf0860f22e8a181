//! Lines on standard output for the operator commands (`admin …`, `fingerprint`,
//! `--print-config`), without `println!`'s panic when the reader has gone
//! (`chat-server admin stats | head -2`).

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once standard output could not be written: later lines are not tried.
static GONE: AtomicBool = AtomicBool::new(false);

/// Writes one line (`args` and a newline) to standard output. When the reader has gone
/// (a broken pipe) this line and every later one are dropped quietly, and the command
/// carries on: what it does (a removal, a migration) is not cut short by where its
/// report goes. Any other write failure (e.g. a full disk behind a redirect) is said once
/// on standard error, if that can be written ([`warn`]).
pub(crate) fn line(args: std::fmt::Arguments) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    // Standard output is line-buffered: the newline writes the line, or fails.
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        GONE.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            warn(format_args!(
                "warning: standard output cannot be written ({e}); the command goes on \
                 without printing"
            ));
        }
    }
}

/// Writes one line to standard error, as `eprintln!` does but without its panic when
/// standard error cannot be written either (`… > log 2>&1` on a full disk): the line is
/// then lost, and the command carries on.
pub(crate) fn warn(args: std::fmt::Arguments) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// `println!` for the operator commands: see [`line`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// `eprintln!` for the operator commands' progress lines: see [`warn`].
macro_rules! say_err {
    ($($arg:tt)*) => {
        $crate::say::warn(format_args!($($arg)*))
    };
}
pub(crate) use say_err;
