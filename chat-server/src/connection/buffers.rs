//! A connection's buffer memory: kept while it is busy, given back once it is quiet.
//!
//! A pipelined stream fills the read and write buffers past their idle size on every
//! batch; freeing them after each write and growing them again for the next cost part of
//! the allocator's fifth of the relay's time (docs/PERFORMANCE.md). So after a write only
//! what is over [`BURST_BUFFER_MAX`] (or [`BURST_ROOM`] in-flight queue entries) is given
//! back, and
//! the rest [`QUIET_TRIM_AFTER`] after the last read or write that found a buffer grown,
//! so idle connections stay small. Sizes are of the allocation, not of what is left of it
//! ([`allocated`]).

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::bytes::BytesMut;

use super::Handler;

/// Initial read buffer (bytes), for the login's frames; it grows while a large frame
/// arrives or several arrive in one read. Given back after the login and by the trims (an
/// idle session holds no buffer).
pub(super) const READ_BUFFER: usize = 1024;
/// A buffer over this many bytes is grown: given back once empty and the connection quiet
/// (a frame half read stays until it is whole).
pub(super) const IDLE_BUFFER_MAX: usize = 4096;
/// A buffer over this many bytes is given back by the first write that finds it empty
/// (after a big frame); up to it a busy connection keeps it between batches.
pub(super) const BURST_BUFFER_MAX: usize = 64 * 1024;
/// In-flight queue entries kept between batches; room for more is given back by the first
/// write that finds the queue empty.
pub(super) const BURST_ROOM: usize = 128;
/// How long after the last read or write that found a buffer grown it is given back.
pub(super) const QUIET_TRIM_AFTER: Duration = Duration::from_secs(1);

/// When a connection's grown buffers are given back: [`QUIET_TRIM_AFTER`] after the last
/// read or write that found one grown. Frames that do not need the room (keep-alives,
/// small requests) do not put it off.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct QuietTrim {
    /// The last read or write that found a buffer over its idle size; `None` if none has
    /// since the last trim.
    grown_at: Option<Instant>,
}

impl QuietTrim {
    /// A read or write at `now` found a buffer over its idle size.
    pub(super) fn grew(&mut self, now: Instant) {
        self.grown_at = Some(now);
    }

    /// When to trim; `None` if nothing grew since the last trim.
    pub(super) fn due(&self) -> Option<Instant> {
        self.grown_at.map(|grown| grown + QUIET_TRIM_AFTER)
    }

    /// The trim was made: nothing is due until a read or write finds a buffer grown again
    /// (what could not be given back, a frame half read, is looked at then, so the
    /// deadline is never left in the past).
    pub(super) fn trimmed(&mut self) {
        self.grown_at = None;
    }
}

/// The bytes `buf`'s allocation holds. The codecs consume a buffer from its front, and
/// `capacity()` counts only what lies after that; an empty buffer is first moved back to
/// the start of its allocation (`BytesMut::try_reclaim`, which never allocates).
pub(super) fn allocated(buf: &mut BytesMut) -> usize {
    if buf.is_empty() {
        let _ = buf.try_reclaim(buf.capacity() + 1);
    }
    buf.capacity()
}

impl Handler {
    /// Gives back the read and write buffers if empty and over `max` bytes, and the
    /// in-flight queue's room if empty and over `room` entries. True if any of them is
    /// still over its idle size, or the inbox holds room (given back only when quiet).
    fn trim_buffers(&mut self, max: usize, room: usize) -> bool {
        let write = self.writer.write_buffer_mut();
        if write.is_empty() && allocated(write) > max {
            *write = BytesMut::new();
        }
        let write_grown = write.capacity() > IDLE_BUFFER_MAX;
        self.sends.trim(room);
        let read = self.reader.read_buffer_mut();
        if read.is_empty() && allocated(read) > max {
            *read = BytesMut::new();
        }
        let inbox_grown = (self.membership.as_ref()).is_some_and(|m| m.inbox.holds_room());
        write_grown || read.capacity() > IDLE_BUFFER_MAX || self.sends.grown() || inbox_grown
    }

    /// After a write: gives back what a big frame left, and notes whether anything is left
    /// for the quiet trim.
    pub(super) fn trim_after_write(&mut self) {
        if self.trim_buffers(BURST_BUFFER_MAX, BURST_ROOM) {
            self.quiet_trim.grew(Instant::now());
        }
    }

    /// After a frame is read at `now`: notes a grown read buffer for the quiet trim (a big
    /// frame that needs no answer grows it without a write).
    pub(super) fn note_read(&mut self, now: Instant) {
        if allocated(self.reader.read_buffer_mut()) > IDLE_BUFFER_MAX {
            self.quiet_trim.grew(now);
        }
    }

    /// The login is done: gives back the read and write buffers if empty (the login's
    /// frames, an RSA key and signature, grew them to a few KiB). Most sessions then sit
    /// idle for long stretches; the next frame each way allocates again. Given back at
    /// once, while connections are still arriving, the freed memory goes to the next ones
    /// (given back later, it would stay resident between live allocations).
    pub(super) fn trim_after_login(&mut self) {
        self.trim_buffers(0, super::pipeline::Pipeline::IDLE_ROOM);
    }

    /// The connection has been quiet: gives back everything over its idle size.
    pub(super) fn trim_quiet(&mut self) {
        if let Some(m) = self.membership.as_mut() {
            m.inbox.trim();
        }
        self.trim_buffers(IDLE_BUFFER_MAX, super::pipeline::Pipeline::IDLE_ROOM);
        self.quiet_trim.trimmed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_due_until_a_buffer_grows() {
        let t0 = Instant::now();
        let mut trim = QuietTrim::default();
        assert_eq!(trim.due(), None);
        trim.grew(t0);
        assert_eq!(trim.due(), Some(t0 + QUIET_TRIM_AFTER));
    }

    #[test]
    fn a_busy_connection_is_trimmed_only_after_its_last_burst() {
        let t0 = Instant::now();
        let mut trim = QuietTrim::default();
        trim.grew(t0);
        let later = t0 + Duration::from_millis(900);
        trim.grew(later);
        assert_eq!(trim.due(), Some(later + QUIET_TRIM_AFTER));
    }

    #[test]
    fn once_trimmed_no_deadline_is_left_in_the_past() {
        let t0 = Instant::now();
        let mut trim = QuietTrim::default();
        trim.grew(t0);
        trim.trimmed();
        // Even if a buffer could not be given back, the timer is not re-armed at a past
        // instant (which would spin the connection's loop).
        assert_eq!(trim.due(), None);
    }

    #[test]
    fn a_consumed_buffer_counts_its_whole_allocation() {
        use tokio_util::bytes::Buf;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        buf.extend_from_slice(&[7; 14 * 1024]);
        // As the codecs do: the front consumed, nothing left.
        buf.advance(14 * 1024);
        assert!(
            buf.capacity() < IDLE_BUFFER_MAX,
            "capacity() alone misses it"
        );
        assert!(allocated(&mut buf) >= 16 * 1024);
        assert!(buf.is_empty());
    }
}
