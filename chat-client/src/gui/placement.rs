//! Where a window goes when asked for one half of the screen (`--window-half`): the demo
//! opens alice's and bob's windows side by side, on whatever monitor size there is.

use egui::{Pos2, Vec2};

/// Which half of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Half {
    Left,
    Right,
}

/// The smallest window the layout works in (as the viewport's minimum size).
pub const MIN_SIZE: Vec2 = Vec2::new(640.0, 420.0);
/// Room kept free at the screen's edges (window decorations, a panel or dock).
const MARGIN: f32 = 24.0;
/// Title bar and frame the window manager adds around the inner size.
const DECORATION: Vec2 = Vec2::new(8.0, 40.0);

/// The outer position and inner size for `half` of a monitor of `monitor` points: as
/// large as half the screen allows, never smaller than [`MIN_SIZE`], and always entirely
/// on the screen when the screen holds [`MIN_SIZE`] (on a screen narrower than two
/// minimum windows the two overlap rather than leave it).
pub fn place(monitor: Vec2, half: Half) -> (Pos2, Vec2) {
    let width = ((monitor.x - 3.0 * MARGIN) / 2.0 - DECORATION.x).max(MIN_SIZE.x);
    let height = (monitor.y - 2.0 * MARGIN - DECORATION.y).max(MIN_SIZE.y);
    let outer = Vec2::new(width, height) + DECORATION;
    let x = match half {
        Half::Left => MARGIN,
        Half::Right => (monitor.x - MARGIN - outer.x).max(0.0),
    };
    (
        Pos2::new(x.min(monitor.x - outer.x).max(0.0), MARGIN),
        Vec2::new(width, height),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field report: on 1920/1600/1366-wide screens bob's window was off-screen.
    #[test]
    fn both_halves_are_on_screen_on_common_monitors() {
        for (w, h) in [(1920.0, 1080.0), (1600.0, 900.0), (1366.0, 768.0)] {
            let monitor = Vec2::new(w, h);
            let (left, left_size) = place(monitor, Half::Left);
            let (right, right_size) = place(monitor, Half::Right);
            for (pos, size) in [(left, left_size), (right, right_size)] {
                let outer = size + DECORATION;
                assert!(pos.x >= 0.0 && pos.y >= 0.0, "{w}x{h}: {pos:?}");
                assert!(
                    pos.x + outer.x <= w,
                    "{w}x{h}: right edge {}",
                    pos.x + outer.x
                );
                assert!(
                    pos.y + outer.y <= h,
                    "{w}x{h}: bottom edge {}",
                    pos.y + outer.y
                );
                assert!(size.x >= MIN_SIZE.x && size.y >= MIN_SIZE.y - 0.01);
            }
            assert!(
                left.x + left_size.x + DECORATION.x <= right.x,
                "{w}x{h}: they overlap"
            );
        }
    }

    #[test]
    fn a_narrow_screen_overlaps_the_windows_but_keeps_them_on_it() {
        for w in [1280.0, 1024.0] {
            let monitor = Vec2::new(w, 720.0);
            for half in [Half::Left, Half::Right] {
                let (pos, size) = place(monitor, half);
                assert_eq!(size.x, MIN_SIZE.x);
                assert!(
                    pos.x >= 0.0 && pos.x + size.x + DECORATION.x <= w,
                    "{w}: {pos:?}"
                );
            }
        }
    }
}
