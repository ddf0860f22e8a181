//! Text in every major script: egui's built-in fonts cover Latin, Greek, Cyrillic and some
//! symbols; for the rest (CJK, Hebrew, Arabic, Thai, Devanagari, …) the window falls back
//! to fonts installed on the system, found with `fontdb` and checked glyph by glyph.

use std::collections::BTreeMap;
use std::sync::Arc;

use egui::{FontData, FontDefinitions, FontFamily};

/// One character per script the window must be able to show, with the script's name.
pub const SCRIPT_SAMPLES: &[(&str, char)] = &[
    ("Chinese", '中'),
    ("Japanese kana", 'あ'),
    ("Korean", '한'),
    ("Hebrew", 'ש'),
    ("Arabic", 'ع'),
    ("Thai", 'ก'),
    ("Devanagari", 'अ'),
    ("Greek", 'Ω'),
    ("Cyrillic", 'Я'),
    ("Armenian", 'Ա'),
    ("Georgian", 'ა'),
];

/// egui's default fonts plus, after them, one system font for each script in
/// [`SCRIPT_SAMPLES`] they lack (the first installed face that has the glyph; a face that
/// covers several scripts is added once). Returns the definitions and the scripts still
/// without a font.
pub fn with_system_fallbacks() -> (FontDefinitions, Vec<&'static str>) {
    let mut defs = FontDefinitions::default();
    let mut db = fontdb::Database::new();
    db.load_system_fonts();
    let builtin: Vec<Arc<FontData>> = defs.font_data.values().cloned().collect();
    let covered_by = |data: &[u8], index: u32, c: char| {
        ttf_parser::Face::parse(data, index)
            .ok()
            .and_then(|face| face.glyph_index(c))
            .is_some()
    };
    let mut added: BTreeMap<String, Arc<FontData>> = BTreeMap::new();
    let mut missing = Vec::new();
    for &(script, c) in SCRIPT_SAMPLES {
        let have = builtin
            .iter()
            .chain(added.values())
            .any(|f| covered_by(f.bytes(), f.index, c));
        if have {
            continue;
        }
        let found = db.faces().find_map(|face| {
            let bytes = db
                .with_face_data(face.id, |data, index| {
                    covered_by(data, index, c).then(|| data.to_vec())
                })
                .flatten()?;
            Some((face.post_script_name.clone(), face.index, bytes))
        });
        match found {
            Some((name, index, bytes)) => {
                let key = format!("system:{name}");
                added
                    .entry(key)
                    .or_insert_with(|| Arc::new(FontData::from_blob(Arc::new(bytes), index)));
            }
            None => missing.push(script),
        }
    }
    for (key, data) in added {
        defs.font_data.insert(key.clone(), data);
        for family in [FontFamily::Proportional, FontFamily::Monospace] {
            defs.families.entry(family).or_default().push(key.clone());
        }
    }
    (defs, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the fonts CI installs (DejaVu, WenQuanYi Micro Hei), every sample script has a
    /// glyph: egui never has to draw its replacement box for them.
    #[test]
    fn every_major_script_has_a_glyph() {
        let (defs, missing) = with_system_fallbacks();
        let ctx = egui::Context::default();
        ctx.set_fonts(defs);
        let mut output = ctx.run_ui(egui::RawInput::default(), |_| {});
        output.textures_delta.clear();
        let text: String = SCRIPT_SAMPLES.iter().map(|(_, c)| *c).collect();
        let all = ctx.fonts_mut(|f| f.has_glyphs(&egui::FontId::proportional(14.0), &text));
        if std::env::var_os("CI").is_none() && !missing.is_empty() {
            eprintln!("SKIPPED: no installed font for {missing:?} (CI installs them)");
            return;
        }
        assert!(missing.is_empty(), "no font for {missing:?}");
        assert!(all, "a sample has no glyph: {text}");
    }
}
