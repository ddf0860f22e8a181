//! Text in every major script: egui's built-in fonts cover Latin, Greek, Cyrillic and
//! monochrome emoji; for the rest (CJK, Hebrew, Arabic, Thai, Devanagari, …) the window
//! falls back to fonts installed on the system, found with `fontdb` and checked glyph by
//! glyph, then to the fallback font shipped with the release artifacts (GNU Unifont, in
//! `share/secure-chat-client/fonts` beside `bin/`, or `fonts/` beside the `.exe`). A colour emoji
//! font (COLR, CBDT or sbix tables, e.g. Noto Color Emoji, Segoe UI Emoji, Apple Color
//! Emoji) is put before egui's monochrome one, so flags and ZWJ sequences show as one
//! colour glyph. Text is shaped by egui (HarfRust), so Arabic letters join and a
//! right-to-left run reads right to left; egui has no paragraph-level bidi reordering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// Where fonts come from: the system's, and directories of bundled ones (searched after).
#[derive(Debug, Clone, Default)]
pub struct FontSources {
    pub system: bool,
    pub bundled: Vec<PathBuf>,
}

impl FontSources {
    /// The system's fonts, then the fallback shipped beside this executable.
    pub fn installed() -> Self {
        Self {
            system: true,
            bundled: bundled_font_dirs(),
        }
    }
}

/// Directories holding the release artifacts' fallback font, relative to the running
/// executable: `../share/secure-chat-client/fonts` (.deb, .tar.gz) and `fonts` (Windows
/// .zip).
pub fn bundled_font_dirs() -> Vec<PathBuf> {
    let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
    else {
        return Vec::new();
    };
    [
        exe_dir.join("../share/secure-chat-client/fonts"),
        exe_dir.join("fonts"),
    ]
    .into_iter()
    .filter(|d| d.is_dir())
    .collect()
}

/// [`with_fallbacks`] from [`FontSources::installed`].
pub fn with_system_fallbacks() -> (FontDefinitions, Vec<&'static str>) {
    with_fallbacks(&FontSources::installed())
}

/// egui's default fonts plus, after them, one font for each script in [`SCRIPT_SAMPLES`]
/// they lack (the first face that has the glyph, system fonts before bundled ones; a face
/// that covers several scripts is added once), and a colour emoji font before egui's
/// monochrome emoji. Returns the definitions and the scripts still without a font.
pub fn with_fallbacks(sources: &FontSources) -> (FontDefinitions, Vec<&'static str>) {
    let mut defs = FontDefinitions::default();
    let mut db = fontdb::Database::new();
    if sources.system {
        db.load_system_fonts();
    }
    for dir in &sources.bundled {
        db.load_fonts_dir(dir);
    }
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
        match find_face(&db, |data, index| covered_by(data, index, c)) {
            Some((name, index, bytes)) => {
                added
                    .entry(format!("fallback:{name}"))
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
    if let Some((name, index, bytes)) = find_face(&db, |data, index| {
        ttf_parser::Face::parse(data, index).is_ok_and(|face| {
            let tables = face.tables();
            (tables.colr.is_some() || tables.cbdt.is_some() || tables.sbix.is_some())
                && face.glyph_index('😀').is_some()
        })
    }) {
        let key = format!("emoji:{name}");
        defs.font_data.insert(
            key.clone(),
            Arc::new(FontData::from_blob(Arc::new(bytes), index)),
        );
        // Right after each family's first (text) font: before the monochrome emoji font,
        // after the font that has the letters and digits.
        for family in [FontFamily::Proportional, FontFamily::Monospace] {
            let list = defs.families.entry(family).or_default();
            list.insert(list.len().min(1), key.clone());
        }
    }
    (defs, missing)
}

/// The first face in `db` that `wanted(data, index)` accepts: its PostScript name, index
/// in its file, and the file's bytes.
fn find_face(
    db: &fontdb::Database,
    wanted: impl Fn(&[u8], u32) -> bool,
) -> Option<(String, u32, Vec<u8>)> {
    db.faces().find_map(|face| {
        let bytes = db
            .with_face_data(face.id, |data, index| {
                wanted(data, index).then(|| data.to_vec())
            })
            .flatten()?;
        Some((face.post_script_name.clone(), face.index, bytes))
    })
}

#[cfg(test)]
mod tests;
