//! The window's colours in both themes, chosen to meet WCAG 2.1 level AA: text at least
//! 4.5:1 against what it sits on (success criterion 1.4.3) and the edges of bubbles,
//! inputs and status dots at least 3:1 against the panel (1.4.11). The tests below check
//! every pair the window draws, with WCAG's relative luminance and contrast ratio.

use egui::{Color32, Stroke, Visuals};

/// Colours the window draws with, for one theme.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Palette {
    /// Background of panels and windows.
    pub panel: Color32,
    /// Body text (messages, labels).
    pub text: Color32,
    /// Secondary text: timestamps, delivery marks, hints.
    pub weak_text: Color32,
    /// Our messages' bubbles.
    pub bubble_out: Color32,
    /// Received messages' bubbles.
    pub bubble_in: Color32,
    /// The outline of both kinds of bubble.
    pub bubble_edge: Color32,
    /// Text inputs (composer, search) and their outline.
    pub input: Color32,
    pub input_edge: Color32,
    /// Presence dots.
    pub online: Color32,
    pub offline: Color32,
    /// Banners (white text on them): a changed key, a changed *verified* key.
    pub warn_banner: Color32,
    pub danger_banner: Color32,
    /// Error text (status bar, sign-in, the composer's counter over the limit).
    pub error: Color32,
}

/// The dark theme.
pub const DARK: Palette = Palette {
    panel: Color32::from_gray(0x1b),
    text: Color32::from_gray(0xe6),
    weak_text: Color32::from_gray(0xb4),
    bubble_out: Color32::from_rgb(0x0c, 0x3f, 0x52),
    bubble_in: Color32::from_gray(0x2a),
    bubble_edge: Color32::from_gray(0x7a),
    input: Color32::from_gray(0x10),
    input_edge: Color32::from_gray(0x8a),
    online: Color32::from_rgb(0x2e, 0xa0, 0x43),
    offline: Color32::from_gray(0x8a),
    warn_banner: Color32::from_rgb(0x8a, 0x5a, 0x00),
    danger_banner: Color32::from_rgb(0xa3, 0x1d, 0x1d),
    error: Color32::from_rgb(0xff, 0x7b, 0x72),
};

/// The light theme.
pub const LIGHT: Palette = Palette {
    panel: Color32::from_gray(0xf8),
    text: Color32::from_gray(0x1a),
    weak_text: Color32::from_gray(0x55),
    bubble_out: Color32::from_rgb(0xd6, 0xeb, 0xf5),
    bubble_in: Color32::WHITE,
    bubble_edge: Color32::from_gray(0x8c),
    input: Color32::WHITE,
    input_edge: Color32::from_gray(0x76),
    online: Color32::from_rgb(0x1f, 0x7a, 0x32),
    offline: Color32::from_gray(0x80),
    warn_banner: Color32::from_rgb(0x8a, 0x5a, 0x00),
    danger_banner: Color32::from_rgb(0xa3, 0x1d, 0x1d),
    error: Color32::from_rgb(0xb3, 0x26, 0x1e),
};

/// Avatar backgrounds (white initials on them), chosen so each has at least 4.5:1
/// contrast with white (tested).
pub const AVATAR_COLOURS: [Color32; 8] = [
    Color32::from_rgb(0x1f, 0x5f, 0xa8),
    Color32::from_rgb(0x8a, 0x3f, 0xa0),
    Color32::from_rgb(0xa3, 0x3b, 0x1d),
    Color32::from_rgb(0x1b, 0x6e, 0x4b),
    Color32::from_rgb(0x6b, 0x5a, 0x00),
    Color32::from_rgb(0x9c, 0x27, 0x5a),
    Color32::from_rgb(0x2f, 0x5d, 0x6e),
    Color32::from_rgb(0x5b, 0x4b, 0xa6),
];

/// A name's avatar colour: the same name always gets the same one (FNV-1a of its bytes).
pub fn avatar_colour(name: &str) -> Color32 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    AVATAR_COLOURS[(hash % AVATAR_COLOURS.len() as u64) as usize]
}

/// The colour of `name` as a sender above a bubble of `bubble` in palette `p`: its
/// avatar colour, moved towards the body text until it reaches 4.5:1 against the bubble
/// (WCAG AA), so names keep their hue and stay readable in both themes (tested).
pub fn name_colour(name: &str, p: &Palette, bubble: Color32) -> Color32 {
    let base = avatar_colour(name);
    (0..=20u8)
        .map(|step| base.lerp_to_gamma(p.text, f32::from(step) / 20.0))
        .find(|&c| contrast(c, bubble) >= 4.5)
        .unwrap_or(p.text)
}

/// The palette for the visuals in use.
pub fn palette(visuals: &Visuals) -> &'static Palette {
    if visuals.dark_mode { &DARK } else { &LIGHT }
}

/// Applies `p` to egui's visuals: panels, text, weak text, text inputs and their edges.
pub fn apply(visuals: &mut Visuals, p: &Palette) {
    visuals.panel_fill = p.panel;
    visuals.window_fill = p.panel;
    visuals.override_text_color = Some(p.text);
    visuals.weak_text_color = Some(p.weak_text);
    visuals.extreme_bg_color = p.input;
    visuals.text_edit_bg_color = Some(p.input);
    visuals.widgets.inactive.bg_stroke = Stroke::new(1.0, p.input_edge);
    visuals.widgets.noninteractive.fg_stroke.color = p.text;
    visuals.error_fg_color = p.error;
}

/// WCAG 2.1 relative luminance of an sRGB colour (alpha ignored), 0.0–1.0.
pub fn luminance(c: Color32) -> f64 {
    let channel = |v: u8| {
        let v = f64::from(v) / 255.0;
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * channel(c.r()) + 0.7152 * channel(c.g()) + 0.0722 * channel(c.b())
}

/// WCAG 2.1 contrast ratio of two colours, 1.0–21.0 (order does not matter).
pub fn contrast(a: Color32, b: Color32) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_formula_matches_wcags_reference_values() {
        assert!((contrast(Color32::BLACK, Color32::WHITE) - 21.0).abs() < 1e-9);
        assert!((contrast(Color32::WHITE, Color32::WHITE) - 1.0).abs() < 1e-9);
        // The pairs the field report measured: too low, as reported.
        let grey = Color32::from_gray(0x8c);
        assert!(contrast(grey, Color32::from_rgb(0x0c, 0x3f, 0x52)) < 4.5);
        assert!(contrast(Color32::from_gray(0xfd), Color32::from_gray(0xf8)) < 1.1);
    }

    #[test]
    fn every_pair_the_window_draws_meets_wcag_aa_in_both_themes() {
        for (name, p) in [("dark", DARK), ("light", LIGHT)] {
            let text_pairs = [
                ("text on panel", p.text, p.panel),
                ("weak text on panel", p.weak_text, p.panel),
                ("text on our bubble", p.text, p.bubble_out),
                ("weak text on our bubble", p.weak_text, p.bubble_out),
                ("text on their bubble", p.text, p.bubble_in),
                ("weak text on their bubble", p.weak_text, p.bubble_in),
                ("text in an input", p.text, p.input),
                ("hint in an input", p.weak_text, p.input),
                ("white on the warning banner", Color32::WHITE, p.warn_banner),
                (
                    "white on the danger banner",
                    Color32::WHITE,
                    p.danger_banner,
                ),
                ("\"✔ Verified\" on panel", p.online, p.panel),
                ("error text on panel", p.error, p.panel),
                ("error text in an input", p.error, p.input),
            ];
            for (what, fg, bg) in text_pairs {
                let ratio = contrast(fg, bg);
                assert!(ratio >= 4.5, "{name}: {what} is {ratio:.2}:1, under 4.5:1");
            }
            for colour in AVATAR_COLOURS {
                let ratio = contrast(Color32::WHITE, colour);
                assert!(ratio >= 4.5, "initials on {colour:?}: {ratio:.2}:1");
            }
            // Senders' names above group bubbles: every avatar hue, both bubbles.
            for i in 0..64 {
                let sender = format!("user{i}");
                for bubble in [p.bubble_in, p.bubble_out] {
                    let ratio = contrast(name_colour(&sender, &p, bubble), bubble);
                    assert!(ratio >= 4.5, "{name}: {sender}'s name is {ratio:.2}:1");
                }
            }
            let edge_pairs = [
                ("bubble edge on panel", p.bubble_edge, p.panel),
                ("input edge on panel", p.input_edge, p.panel),
                ("online dot on panel", p.online, p.panel),
                ("offline dot on panel", p.offline, p.panel),
            ];
            for (what, fg, bg) in edge_pairs {
                let ratio = contrast(fg, bg);
                assert!(ratio >= 3.0, "{name}: {what} is {ratio:.2}:1, under 3:1");
            }
        }
    }
}
