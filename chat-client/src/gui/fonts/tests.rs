use super::*;

/// Lays `text` out with `defs` at 20 points (after one frame, so the fonts are in place).
fn layout(defs: FontDefinitions, texts: &[&str]) -> Vec<Arc<egui::Galley>> {
    let ctx = egui::Context::default();
    ctx.set_fonts(defs);
    let mut output = ctx.run_ui(egui::RawInput::default(), |_| {});
    output.textures_delta.clear();
    ctx.fonts_mut(|f| {
        texts
            .iter()
            .map(|t| {
                f.layout_no_wrap(
                    t.to_string(),
                    egui::FontId::proportional(20.0),
                    egui::Color32::WHITE,
                )
            })
            .collect()
    })
}

/// The glyphs that draw something (a cluster's continuation glyphs are empty).
fn drawn(galley: &egui::Galley) -> Vec<&egui::epaint::text::Glyph> {
    galley
        .rows
        .iter()
        .flat_map(|r| &r.glyphs)
        .filter(|g| !g.uv_rect.is_nothing())
        .collect()
}

/// Outside CI a missing font skips the test (with a note); in CI it fails it.
fn have_or_skip(ok: bool, what: &str) -> bool {
    if !ok && std::env::var_os("CI").is_none() {
        eprintln!("SKIPPED: {what} is not installed here (CI installs it)");
        return false;
    }
    assert!(ok, "{what} is not installed");
    true
}

/// With the fonts CI installs (DejaVu, WenQuanYi Micro Hei, …), every sample script has
/// a glyph: egui never has to draw its replacement box for them.
#[test]
fn every_major_script_has_a_glyph() {
    let (defs, missing) = with_system_fallbacks();
    let text: String = SCRIPT_SAMPLES.iter().map(|(_, c)| *c).collect();
    if !have_or_skip(missing.is_empty(), &format!("a font for {missing:?}")) {
        return;
    }
    let ctx = egui::Context::default();
    ctx.set_fonts(defs);
    let mut output = ctx.run_ui(egui::RawInput::default(), |_| {});
    output.textures_delta.clear();
    let all = ctx.fonts_mut(|f| f.has_glyphs(&egui::FontId::proportional(14.0), &text));
    assert!(all, "a sample has no glyph: {text}");
}

/// On a bare machine (no system fonts at all) the fallback the release artifacts ship
/// (GNU Unifont, as `cargo xtask dist` copies it) still gives every script a glyph.
#[test]
fn the_bundled_fallback_alone_covers_every_script() {
    let unifont = Path::new("/usr/share/fonts/opentype/unifont/unifont.otf");
    if !have_or_skip(unifont.is_file(), "fonts-unifont") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(unifont, dir.path().join("unifont.otf")).unwrap();
    let bare = FontSources {
        system: false,
        bundled: vec![],
    };
    let (_, missing) = with_fallbacks(&bare);
    assert!(
        missing.contains(&"Chinese") && missing.contains(&"Arabic"),
        "egui's own fonts have no CJK or Arabic: {missing:?}"
    );
    let bundled = FontSources {
        system: false,
        bundled: vec![dir.path().to_owned()],
    };
    let (defs, missing) = with_fallbacks(&bundled);
    assert!(missing.is_empty(), "still no font for {missing:?}");
    let text: String = SCRIPT_SAMPLES.iter().map(|(_, c)| *c).collect();
    let galley = &layout(defs, &[&text])[0];
    assert_eq!(drawn(galley).len(), SCRIPT_SAMPLES.len(), "{text}");
}

/// A family (man, ZWJ, woman, ZWJ, girl) and a flag are one colour glyph each, not three
/// figures or two letters, when a colour emoji font is installed (Noto Color Emoji in CI).
#[test]
fn emoji_sequences_are_one_colour_glyph() {
    let (defs, _) = with_system_fallbacks();
    let has_colour = defs.font_data.keys().any(|k| k.starts_with("emoji:"));
    if !have_or_skip(has_colour, "a colour emoji font (fonts-noto-color-emoji)") {
        return;
    }
    let galleys = layout(defs, &["👨\u{200d}👩\u{200d}👧", "🇫🇷", "👋🏽"]);
    for galley in &galleys {
        let glyphs = drawn(galley);
        assert_eq!(
            glyphs.len(),
            1,
            "{:?} drew {} glyphs",
            galley.job.text,
            glyphs.len()
        );
        assert!(glyphs[0].is_color, "{:?} is not in colour", galley.job.text);
    }
}

/// Arabic letters join (a letter inside a word is not its isolated form) and the word
/// reads right to left: its first letter is drawn right of its last.
#[test]
fn arabic_joins_and_reads_right_to_left() {
    let (defs, missing) = with_system_fallbacks();
    if !have_or_skip(
        !missing.contains(&"Arabic"),
        "an Arabic font (fonts-dejavu-core)",
    ) {
        return;
    }
    let galleys = layout(defs, &["سلم", "س", "ل"]);
    let word = &galleys[0];
    let find = |g: &egui::Galley, c: char| {
        g.rows[0]
            .glyphs
            .iter()
            .find(|x| x.chr == c)
            .copied()
            .unwrap()
    };
    let (first, middle, last) = (find(word, 'س'), find(word, 'ل'), find(word, 'م'));
    assert!(
        first.pos.x > middle.pos.x && middle.pos.x > last.pos.x,
        "not right to left: {} {} {}",
        first.pos.x,
        middle.pos.x,
        last.pos.x
    );
    let isolated = find(&galleys[2], 'ل');
    assert_ne!(
        (middle.uv_rect.min, middle.uv_rect.max),
        (isolated.uv_rect.min, isolated.uv_rect.max),
        "the medial lam is drawn as the isolated one: the letters do not join"
    );
}
