//! Self-contained SVG drawing shared by swift's charts (the fine-tune loss
//! curve, the eval bar chart): a small built-in vector stroke font, so labels
//! are `<path>` geometry that looks the same everywhere, including on machines
//! with no fonts installed, and number formatting with at most two decimals so
//! the output is deterministic.

use std::fmt::Write as _;

/// Cap height of the stroke font in font units: cap tops sit at y = 0, the
/// baseline at y = 8, the x-height at y = 3 and descenders reach y = 11.
pub(crate) const CAP: f64 = 8.0;
/// Space after a glyph's right-most coordinate, in font units.
const GAP: f64 = 2.2;
/// Advance of a space character, in font units.
const SPACE: f64 = 3.6;
/// Stroke width of the font, in font units.
const PEN: f64 = 1.1;
/// Glyph drawn for characters the font lacks.
const FALLBACK: &str = "01104051522425 28";
/// Colour of labels, spines and ticks.
pub(crate) const INK: &str = "#262626";
/// Round line caps and joins.
pub(crate) const ROUND: &str = r#"stroke-linecap="round" stroke-linejoin="round""#;

/// The stroke font, one `c=glyph|` entry per character. A glyph is a list of
/// polylines separated by spaces; a polyline is a run of points, each written
/// as two base-36 digits `xy` with y growing downwards. A polyline of a single
/// point is a dot.
const GLYPHS: &str = concat!(
    "0=203052563828060220|1=123038 1858|2=01104051530858|",
    "3=01104051534424 445557481807|4=48400656|5=500003435457481807|",
    "6=4020020718485755441405|7=00505128|8=104051534414030110 1405071848575544|",
    "9=1838565140100103144453|.=08|,=171809|:=04 08|-=0535|+=0444 2226|==0343 0545|",
    "_=0949|(=201103061829|)=001123261809|/=4008|",
    "%=10212213020110 45565748373645 5008|?=01104051522425 28|A=08203058 1545|",
    "B=08004051534404 4455574808|C=5140200206284857|D=08003052563808|E=50000858 0444|",
    "F=500008 0444|G=51402002062848575434|H=0008 5058 0454|I=0020 1018 0828|",
    "J=4047381806|K=0008 5005 2358|L=000858|M=0800356068|N=08005850|",
    "O=204062664828060220|P=08004051534404|Q=204062664828060220 3569|",
    "R=08004051534404 3458|S=514010010314445557481807|T=0060 3038|U=000628385650|",
    "V=003860|W=0028324860|X=0058 5008|Y=003460 3438|Z=00500858|",
    "a=4348 4433130407183847|b=0008 0413334447381807|c=4433130407183847|",
    "d=4048 4433130407183847|e=05454433130407183847|f=30201118 0333|",
    "g=43493b1b0a 4433130407183847|h=0008 0413334448|i=0308 01|j=131a0b 11|",
    "k=0008 3306 1538|l=0008|m=0308 0413233438 3443536468|n=0308 0413334448|",
    "o=133344473818070413|p=030b 0413334447381807|q=434b 4433130407183847|",
    "r=0308 041333|s=44331304153647381807|t=11172838 0333|u=0307183847 4348|v=032843|",
    "w=0318345863|x=0348 4308|y=0328 43281a0b|z=03430848|",
);

/// Stroke-font glyph of `c`, or a question mark for characters it lacks.
fn glyph(c: char) -> &'static str {
    GLYPHS.split('|').find_map(|e| e.strip_prefix(c)?.strip_prefix('=')).unwrap_or(FALLBACK)
}

/// Points of one glyph polyline, in font units.
fn glyph_points(stroke: &str) -> impl Iterator<Item = (f64, f64)> + '_ {
    let unit = |b: u8| f64::from((b as char).to_digit(36).unwrap_or(0));
    stroke.as_bytes().chunks_exact(2).map(move |p| (unit(p[0]), unit(p[1])))
}

/// Horizontal advance of a character, in font units.
fn advance(c: char) -> f64 {
    if c == ' ' {
        return SPACE;
    }
    let right = glyph(c).split(' ').flat_map(glyph_points).map(|p| p.0).fold(0.0, f64::max);
    right + GAP
}

/// Drawn width in pixels of `text` at cap height `cap`.
pub(crate) fn text_width(text: &str, cap: f64) -> f64 {
    let units: f64 = text.chars().map(advance).sum();
    (units - GAP).max(0.0) * cap / CAP
}

/// Appends path data for `text` whose baseline starts at `(x, y)`. Vertical
/// text reads bottom to top, its baseline running upwards from `(x, y)`.
pub(crate) fn text_path(d: &mut String, text: &str, x: f64, y: f64, cap: f64, vertical: bool) {
    let u = cap / CAP;
    let map = |gx: f64, gy: f64| {
        if vertical {
            (x + (gy - CAP) * u, y - gx * u)
        } else {
            (x + gx * u, y + (gy - CAP) * u)
        }
    };
    let mut pen = 0.0;
    for c in text.chars() {
        if c != ' ' {
            for stroke in glyph(c).split(' ') {
                let mut pts: Vec<(f64, f64)> = glyph_points(stroke).collect();
                if let [(gx, gy)] = pts[..] {
                    pts = vec![(gx - 0.3, gy), (gx + 0.3, gy)];
                }
                for (i, &(gx, gy)) in pts.iter().enumerate() {
                    let (px, py) = map(pen + gx, gy);
                    let _ = write!(d, "{}{} {}", if i == 0 { 'M' } else { 'L' }, num(px), num(py));
                }
            }
        }
        pen += advance(c);
    }
}

/// Appends a stroked `<path>` for text path data drawn at cap height `cap`.
pub(crate) fn text_element(out: &mut String, d: &str, cap: f64, color: &str) {
    if !d.is_empty() {
        let sw = num(cap / CAP * PEN);
        let _ = writeln!(out, r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="{sw}" {ROUND}/>"#);
    }
}

/// Formats a coordinate with at most two decimals and no trailing zeros.
pub(crate) fn num(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// Escapes a string for use inside an XML attribute value.
pub(crate) fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&apos;".into(),
            c if c.is_control() => " ".into(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn font_covers_the_required_characters() {
        let required = "0123456789.-+e:()/,% abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for c in required.chars().filter(|&c| c != ' ') {
            let g = glyph(c);
            assert!(g != FALLBACK, "no glyph for {c:?}");
            for stroke in g.split(' ') {
                assert!(!stroke.is_empty() && stroke.len() % 2 == 0, "bad stroke {stroke:?} in {c:?}");
                assert!(glyph_points(stroke).all(|(x, y)| x <= 8.0 && y <= 11.0), "{c:?} off grid");
            }
        }
        assert!(text_width("loss", 8.0) > 0.0 && text_width("", 8.0) == 0.0);
    }
}
