//! A connection's buffer memory: kept while it is busy, given back once it is quiet.
//!
//! A pipelined stream fills the read and write buffers past their idle size on every
//! batch; freeing them after each write and growing them again for the next cost a fifth
//! of the relay's time in the allocator (docs/PERFORMANCE.md). So after a write only
//! buffers past [`BURST_BUFFER_MAX`] are given back, and the rest once nothing has been
//! heard or written for [`QUIET_TRIM_AFTER`], so idle connections stay small.

use std::time::Duration;

use tokio::time::Instant;

use super::Handler;

/// Initial read buffer; it grows only while a large frame or a burst is arriving.
pub(super) const READ_BUFFER: usize = 1024;
/// An idle connection's buffers hold at most this many bytes each: larger ones are given
/// back once empty and the connection quiet.
pub(super) const IDLE_BUFFER_MAX: usize = 4096;
/// Buffers larger than this (bytes) are given back as soon as they are empty (after a big
/// frame or a very large burst); up to it a busy connection keeps them.
pub(super) const BURST_BUFFER_MAX: usize = 64 * 1024;
/// How long a connection must have heard and written nothing before its grown buffers are
/// given back.
pub(super) const QUIET_TRIM_AFTER: Duration = Duration::from_secs(1);

/// When a connection's grown buffers are given back: [`QUIET_TRIM_AFTER`] after the later
/// of the last frame heard and the last write that left a buffer grown.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct QuietTrim {
    /// The last write that left a buffer over its idle size; `None` if none is.
    grown_at: Option<Instant>,
}

impl QuietTrim {
    /// After a write at `now`: `grown` if a buffer is still over its idle size.
    pub(super) fn wrote(&mut self, grown: bool, now: Instant) {
        self.grown_at = grown.then_some(now);
    }

    /// When to trim, given the last frame heard; `None` if nothing is grown.
    pub(super) fn due(&self, last_heard: Instant) -> Option<Instant> {
        self.grown_at
            .map(|grown| grown.max(last_heard) + QUIET_TRIM_AFTER)
    }

    /// The trim was made: nothing is due until a write leaves a buffer grown again (what
    /// could not be given back, a frame half read, is looked at after the next write, so
    /// the deadline is never left in the past).
    pub(super) fn trimmed(&mut self) {
        self.grown_at = None;
    }
}

impl Handler {
    /// Gives back the read and write buffers if empty and over `max` bytes (and, when
    /// `max` is [`IDLE_BUFFER_MAX`], the pipeline's room if empty). True if any of them is
    /// still over its idle size.
    fn trim_buffers(&mut self, max: usize) -> bool {
        let write = self.writer.write_buffer_mut();
        if write.is_empty() && write.capacity() > max {
            *write = Default::default();
        }
        let write_grown = write.capacity() > IDLE_BUFFER_MAX;
        if max <= IDLE_BUFFER_MAX {
            self.sends.trim();
        }
        let read = self.reader.read_buffer_mut();
        if read.is_empty() && read.capacity() > max {
            *read = tokio_util::bytes::BytesMut::with_capacity(READ_BUFFER);
        }
        write_grown || read.capacity() > IDLE_BUFFER_MAX || self.sends.grown()
    }

    /// After a write: gives back what a burst past [`BURST_BUFFER_MAX`] left, and notes
    /// whether anything is left for the quiet trim.
    pub(super) fn trim_after_write(&mut self) {
        let grown = self.trim_buffers(BURST_BUFFER_MAX);
        self.quiet_trim.wrote(grown, Instant::now());
    }

    /// The connection has been quiet: gives back everything over its idle size.
    pub(super) fn trim_quiet(&mut self) {
        self.trim_buffers(IDLE_BUFFER_MAX);
        self.quiet_trim.trimmed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_due_until_a_write_leaves_a_buffer_grown() {
        let t0 = Instant::now();
        let mut trim = QuietTrim::default();
        assert_eq!(trim.due(t0), None);
        trim.wrote(false, t0);
        assert_eq!(trim.due(t0), None);
        trim.wrote(true, t0);
        assert_eq!(trim.due(t0), Some(t0 + QUIET_TRIM_AFTER));
        // A later write that leaves nothing grown: nothing to trim.
        trim.wrote(false, t0 + Duration::from_millis(10));
        assert_eq!(trim.due(t0), None);
    }

    #[test]
    fn a_busy_connection_is_trimmed_only_after_it_goes_quiet() {
        let t0 = Instant::now();
        let mut trim = QuietTrim::default();
        trim.wrote(true, t0);
        // A frame heard later moves the trim later...
        let heard = t0 + Duration::from_millis(700);
        assert_eq!(trim.due(heard), Some(heard + QUIET_TRIM_AFTER));
        // ...and so does a later write that leaves a buffer grown (a receiver that only
        // reads what is written to it).
        let wrote = t0 + Duration::from_millis(900);
        trim.wrote(true, wrote);
        assert_eq!(trim.due(heard), Some(wrote + QUIET_TRIM_AFTER));
    }

    #[test]
    fn once_trimmed_no_deadline_is_left_in_the_past() {
        let t0 = Instant::now();
        let mut trim = QuietTrim::default();
        trim.wrote(true, t0);
        trim.trimmed();
        // Even if a buffer could not be given back, the timer is not re-armed at a past
        // instant (which would spin the connection's loop).
        assert_eq!(trim.due(t0), None);
        assert_eq!(trim.due(t0 + Duration::from_secs(3600)), None);
    }
}
