//! Training-loss curves rendered as self-contained SVG documents.
//!
//! The fine-tune stage draws its loss curve as an SVG image that must look the
//! same everywhere, including on machines with no fonts installed. The output
//! therefore holds no `<text>` elements and no font references: every label is
//! stroked as `<path>` geometry from the built-in stroke font of
//! [`crate::svg`], so the image is pure geometry.
//!
//! The output is deterministic (the same input gives the same bytes) and every
//! coordinate is printed with at most two decimals.

use std::fmt::Write as _;

use crate::svg::{escape, num, text_element, text_path, text_width, INK, ROUND};

/// One series to draw.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// Legend label; an empty label keeps the series out of the legend.
    pub label: &'a str,
    /// `(step, value)` points in drawing order; a point with a non-finite
    /// coordinate is skipped and breaks the line.
    pub points: &'a [(f64, f64)],
    /// Stroke colour, any SVG colour such as `"#1f77b4"`.
    pub color: &'a str,
}

/// Appends a round point marker sized for label cap height `base`.
fn marker(out: &mut String, x: f64, y: f64, base: f64, color: &str) {
    let (x, y, r, sw) = (num(x), num(y), num(base * 0.3), num((base * 0.09).max(0.5)));
    let _ = writeln!(out, r##"<circle cx="{x}" cy="{y}" r="{r}" fill="{color}" stroke="#ffffff" stroke-width="{sw}"/>"##);
}


/// A linear axis: view limits, tick values and tick labels.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

/// View limits around data limits: a constant range widens, then 5 % margins
/// are added on both sides.
fn view_limits(lo: f64, hi: f64, integer: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (lo, hi);
    if hi - lo <= hi.abs().max(lo.abs()) * 1e-12 {
        let mut d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        if integer {
            d = d.max(1.0);
        }
        lo -= d;
        hi += d;
    }
    let m = (hi - lo) * 0.05;
    (lo - m, hi + m)
}

/// Multiples of `step` inside `[lo, hi]`.
fn ticks_for(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let (first, last) = ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor());
    let mut ticks = Vec::new();
    let mut n = first;
    while n <= last && ticks.len() < 1000 {
        let t = n * step;
        ticks.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        n += 1.0;
    }
    ticks
}

/// Decimal exponent of `v`, robust to rounding at exact powers of ten.
fn exponent(v: f64) -> i32 {
    (v.abs().log10() + 1e-9).floor() as i32
}

/// Tick labels: fixed notation with the decimals the step needs, or compact
/// scientific notation (`2e-05`, `1.2e+06`) when that is shorter for very
/// small or very large values.
fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let step_exp = exponent(step);
    let decimals = (-step_exp).max(0) as usize;
    let fixed: Vec<String> = ticks
        .iter()
        .map(|t| {
            let s = format!("{t:.decimals$}");
            if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') { s[1..].into() } else { s }
        })
        .collect();
    let longest = |v: &[String]| v.iter().map(String::len).max().unwrap_or(0);
    if decimals > 4 || longest(&fixed) > 6 {
        let sci: Vec<String> = ticks.iter().map(|&t| sci_label(t, step_exp)).collect();
        if longest(&sci) <= longest(&fixed) {
            return sci;
        }
    }
    fixed
}

/// Formats `v` as `1.2e+04`, keeping the digits down to the step's exponent.
fn sci_label(v: f64, step_exp: i32) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = (exponent(v) - step_exp).max(0) as usize;
    let s = format!("{v:.digits$e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let mantissa = if mantissa.contains('.') { mantissa.trim_end_matches('0').trim_end_matches('.') } else { mantissa };
    let exp: i32 = exp.parse().unwrap_or(0);
    format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

/// Picks the finest 1-2-5 step over `[lo, hi]` whose ticks satisfy `fits`.
fn make_axis(lo: f64, hi: f64, integer: bool, fits: impl Fn(&[f64], &[String]) -> bool) -> Axis {
    let mut exp = exponent((hi - lo) / 100.0);
    let mut axis = Axis { lo, hi, ticks: Vec::new(), labels: Vec::new() };
    for _ in 0..16 {
        for m in [1.0, 2.0, 5.0] {
            let step = m * 10f64.powi(exp);
            if integer && step < 1.0 {
                continue;
            }
            axis.ticks = ticks_for(lo, hi, step);
            axis.labels = tick_labels(&axis.ticks, step);
            if fits(&axis.ticks, &axis.labels) {
                return axis;
            }
        }
        exp += 1;
    }
    axis
}

/// Whether a series gets point markers: short series (such as validation
/// losses evaluated every few hundred steps) next to much longer ones.
fn wants_markers(n: usize, longest: usize) -> bool {
    n <= 12 || (n <= 100 && n * 4 <= longest)
}

/// Renders an SVG document (width × height px) with a title, x axis "step",
/// y axis label, nice round tick values on both axes (1-2-5 steps), grid
/// lines, the series as polylines (validation-like short series also get point
/// markers), and a legend.
///
/// Points with a non-finite coordinate are skipped and break the line; with
/// no finite point at all the axes are drawn around a "no data" label. All
/// text is stroked geometry, so the document needs no fonts. Sizes below
/// 160 × 120 are raised to that minimum.
pub fn render_svg(title: &str, y_label: &str, series: &[Series<'_>], width: u32, height: u32) -> String {
    let (w, h) = (f64::from(width.max(160)), f64::from(height.max(120)));
    let base = (w.min(h) / 50.0).clamp(7.0, 14.0);
    let title_cap = (base * 1.25).min((w - base * 2.0) / text_width(title, 1.0).max(1e-9));
    let tick_len = base * 0.45;

    // Finite points, split into runs at non-finite ones.
    let runs: Vec<Vec<Vec<(f64, f64)>>> = series
        .iter()
        .map(|s| {
            let mut runs = vec![Vec::new()];
            for &(x, y) in s.points {
                if x.is_finite() && y.is_finite() {
                    runs.last_mut().unwrap().push((x.clamp(-1e300, 1e300), y.clamp(-1e300, 1e300)));
                } else if !runs.last().unwrap().is_empty() {
                    runs.push(Vec::new());
                }
            }
            runs.retain(|r| !r.is_empty());
            runs
        })
        .collect();
    let all = || runs.iter().flatten().flatten();
    let has_data = all().next().is_some();
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        all().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)))
    };
    let (x_int, (xlo, xhi), (ylo, yhi)) = if has_data {
        (all().all(|p| p.0.fract() == 0.0), bounds(|p| p.0), bounds(|p| p.1))
    } else {
        (false, (0.0, 1.0), (0.0, 1.0))
    };
    let (xlo, xhi) = view_limits(xlo, xhi, x_int);
    let (ylo, yhi) = view_limits(ylo, yhi, false);

    // Layout: margins from the sizes of the labels around the plot.
    let top = if title.trim().is_empty() { base * 1.5 } else { base * 2.1 + title_cap };
    let bottom = tick_len + base * 4.9;
    let plot_h = (h - top - bottom).max(base);
    let max_y = ((plot_h / (base * 2.8)) as usize).clamp(2, 10);
    let ya = make_axis(ylo, yhi, false, |t, _| t.len() <= max_y);
    let label_w = ya.labels.iter().map(|l| text_width(l, base)).fold(0.0, f64::max);
    let y_label_room = if y_label.trim().is_empty() { 0.0 } else { base * 2.3 };
    let left = base * 0.7 + y_label_room + label_w + base * 0.5 + tick_len;
    let x_axis = |plot_w: f64| {
        make_axis(xlo, xhi, x_int, |t, l| {
            let widest = l.iter().map(|l| text_width(l, base)).fold(0.0, f64::max);
            let gap = if t.len() > 1 { (t[1] - t[0]) / (xhi - xlo) * plot_w } else { plot_w };
            t.len() <= 10 && gap >= widest + base * 1.5
        })
    };
    let last_half = |a: &Axis| a.labels.last().map_or(0.0, |l| text_width(l, base) / 2.0);
    let right = (base * 2.0).max(last_half(&x_axis(w - left - base * 2.0)) + base * 0.6);
    let plot_w = (w - left - right).max(base);
    let xa = x_axis(plot_w);
    let (x0, y0, x1, y1) = (left, top, left + plot_w, top + plot_h);
    let px = |x: f64| x0 + (x - xa.lo) / (xa.hi - xa.lo) * plot_w;
    let py = |y: f64| y0 + (ya.hi - y) / (ya.hi - ya.lo) * plot_h;

    let mut out = String::new();
    let (ws, hs) = (num(w), num(h));
    let _ = writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{ws}" height="{hs}" viewBox="0 0 {ws} {hs}">"#);
    let _ = writeln!(out, r##"<rect x="0" y="0" width="{ws}" height="{hs}" fill="#ffffff"/>"##);

    // Grid lines and tick marks.
    let (mut grid, mut marks) = (String::new(), String::new());
    for &t in &xa.ticks {
        let x = num(px(t));
        let _ = write!(grid, "M{x} {}V{}", num(y0), num(y1));
        let _ = write!(marks, "M{x} {}V{}", num(y1), num(y1 + tick_len));
    }
    for &t in &ya.ticks {
        let y = num(py(t));
        let _ = write!(grid, "M{} {y}H{}", num(x0), num(x1));
        let _ = write!(marks, "M{} {y}H{}", num(x0 - tick_len), num(x0));
    }
    let thin = num((base * 0.08).max(0.6));
    if !grid.is_empty() {
        let _ = writeln!(out, r##"<path d="{grid}" fill="none" stroke="#e0e0e0" stroke-width="{thin}"/>"##);
    }

    // Series.
    let longest = runs.iter().map(|r| r.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
    let line_w = (base * 0.18).max(1.0);
    let mut occupied = Vec::new();
    for (s, runs) in series.iter().zip(&runs) {
        let color = escape(s.color);
        let markers = wants_markers(runs.iter().map(Vec::len).sum(), longest);
        for run in runs {
            let mut pts: Vec<String> = Vec::new();
            for &(x, y) in run {
                occupied.push((px(x), py(y)));
                let p = format!("{},{}", num(px(x)), num(py(y)));
                if pts.last() != Some(&p) {
                    pts.push(p);
                }
            }
            if pts.len() > 1 {
                let (pts, lw) = (pts.join(" "), num(line_w));
                let _ = writeln!(out, r#"<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{lw}" {ROUND}/>"#);
            }
            if markers || run.len() == 1 {
                run.iter().for_each(|&(x, y)| marker(&mut out, px(x), py(y), base, &color));
            }
        }
    }

    // Frame, ticks and tick labels.
    let (fx, fy, fw, fh, sw) = (num(x0), num(y0), num(plot_w), num(plot_h), num((base * 0.09).max(0.8)));
    let _ = writeln!(out, r#"<rect x="{fx}" y="{fy}" width="{fw}" height="{fh}" fill="none" stroke="{INK}" stroke-width="{sw}"/>"#);
    if !marks.is_empty() {
        let _ = writeln!(out, r#"<path d="{marks}" fill="none" stroke="{INK}" stroke-width="{thin}"/>"#);
    }
    let mut d = String::new();
    for (&t, l) in xa.ticks.iter().zip(&xa.labels) {
        text_path(&mut d, l, px(t) - text_width(l, base) / 2.0, y1 + tick_len + base * 0.6 + base, base, false);
    }
    for (&t, l) in ya.ticks.iter().zip(&ya.labels) {
        text_path(&mut d, l, x0 - tick_len - base * 0.5 - text_width(l, base), py(t) + base / 2.0, base, false);
    }
    // Axis labels and title.
    let x_label = "step";
    text_path(&mut d, x_label, x0 + (plot_w - text_width(x_label, base)) / 2.0, h - base * 1.1, base, false);
    if !y_label.trim().is_empty() {
        let yl = (y0 + y1 + text_width(y_label, base)) / 2.0;
        text_path(&mut d, y_label, base * 0.7 + base, yl, base, true);
    }
    text_element(&mut out, &d, base, INK);
    if !title.trim().is_empty() {
        let mut d = String::new();
        let tw = text_width(title, title_cap);
        let tx = (x0 + (plot_w - tw) / 2.0).min(w - base - tw).max(base);
        text_path(&mut d, title, tx, base * 1.1 + title_cap, title_cap, false);
        text_element(&mut out, &d, title_cap, INK);
    }

    if !has_data {
        let mut d = String::new();
        let cap = base * 1.2;
        text_path(&mut d, "no data", x0 + (plot_w - text_width("no data", cap)) / 2.0, (y0 + y1 + cap) / 2.0, cap, false);
        text_element(&mut out, &d, cap, "#8c8c8c");
    } else {
        legend(&mut out, series, &runs, longest, (x0, y0, x1, y1), base, &occupied);
    }
    out.push_str("</svg>\n");
    out
}

/// Draws the legend box in the plot corner that covers the fewest points.
fn legend(
    out: &mut String,
    series: &[Series<'_>],
    runs: &[Vec<Vec<(f64, f64)>>],
    longest: usize,
    (x0, y0, x1, y1): (f64, f64, f64, f64),
    base: f64,
    occupied: &[(f64, f64)],
) {
    let entries: Vec<(&Series<'_>, bool)> = series
        .iter()
        .zip(runs)
        .filter(|(s, _)| !s.label.trim().is_empty())
        .map(|(s, r)| (s, wants_markers(r.iter().map(Vec::len).sum(), longest)))
        .collect();
    if entries.is_empty() {
        return;
    }
    let (pad, sample, row) = (base * 0.7, base * 2.4, base * 1.9);
    let label_w = entries.iter().map(|(s, _)| text_width(s.label, base)).fold(0.0, f64::max);
    let (bw, bh) = (pad * 2.0 + sample + base * 0.8 + label_w, pad * 2.0 + row * entries.len() as f64 - base * 0.5);
    let m = base * 0.8;
    let corners = [(x1 - m - bw, y0 + m), (x0 + m, y0 + m), (x0 + m, y1 - m - bh), (x1 - m - bw, y1 - m - bh)];
    let covered = |&(bx, by): &(f64, f64)| {
        occupied.iter().filter(|&&(x, y)| x >= bx && x <= bx + bw && y >= by && y <= by + bh).count()
    };
    let (bx, by) = corners.iter().fold(corners[0], |best, c| if covered(c) < covered(&best) { *c } else { best });
    let (x, y, w, h, r, sw) = (num(bx), num(by), num(bw), num(bh), num(base * 0.3), num((base * 0.08).max(0.6)));
    let (fill, edge) = (r##"fill="#ffffff" fill-opacity="0.85""##, r##"stroke="#cccccc""##);
    let _ = writeln!(out, r#"<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{r}" {fill} {edge} stroke-width="{sw}"/>"#);
    let mut d = String::new();
    let lw = num((base * 0.18).max(1.0));
    for (i, (s, markers)) in entries.iter().enumerate() {
        let cy = by + pad + row * i as f64 + (row - base * 0.5) / 2.0;
        let color = escape(s.color);
        let (lx0, lx1) = (bx + pad, bx + pad + sample);
        let (x0, y, x1) = (num(lx0), num(cy), num(lx1));
        let _ = writeln!(out, r#"<path d="M{x0} {y}H{x1}" fill="none" stroke="{color}" stroke-width="{lw}" {ROUND}/>"#);
        if *markers {
            marker(out, (lx0 + lx1) / 2.0, cy, base, &color);
        }
        text_path(&mut d, s.label, lx1 + base * 0.8, cy + base / 2.0, base, false);
    }
    text_element(out, &d, base, INK);
}

#[cfg(test)]
mod tests {
    use super::*;

    type Points = Vec<(f64, f64)>;

    fn sample() -> (Points, Points) {
        let mut seed: u64 = 42;
        let mut noise = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5
        };
        let train = (1..=300).map(|s| (s as f64, 0.6 + 2.4 * (-(s as f64) / 60.0).exp() + 0.15 * noise())).collect();
        let val = (0..=6).map(|i| ((i * 50) as f64, 0.75 + 2.2 * (-(i as f64) * 50.0 / 70.0).exp())).collect();
        (train, val)
    }

    fn render(title: &str, series: &[Series<'_>]) -> String {
        render_svg(title, "loss", series, 800, 500)
    }

    fn render_sample() -> String {
        let (train, val) = sample();
        let series = [Series { label: "train", points: &train, color: "#1f77b4" }, Series { label: "validation", points: &val, color: "#ff7f0e" }];
        render("Fine-tune loss (lr 2e-05, 300 steps)", &series)
    }

    /// Balanced tags under one `<svg>` root, even quotes, no text content.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains("viewBox=\"0 0 "));
        let (mut stack, mut rest, mut roots) = (Vec::new(), svg, 0);
        while let Some(open) = rest.find('<') {
            assert!(rest[..open].trim().is_empty(), "stray text {:?}", &rest[..open]);
            let close = open + rest[open..].find('>').expect("unclosed tag");
            let tag = &rest[open + 1..close];
            assert_eq!(tag.matches('"').count() % 2, 0, "quotes in {tag}");
            assert!(!tag[1..].contains('<'), "'<' inside {tag}");
            let name = tag.trim_start_matches('/').split([' ', '/']).next().unwrap();
            if tag.starts_with('/') {
                assert_eq!(stack.pop(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                roots += usize::from(stack.is_empty());
                stack.push(name);
            }
            rest = &rest[close + 1..];
        }
        assert!(rest.trim().is_empty() && stack.is_empty() && roots == 1);
    }

    /// Every number in the document has at most two decimals.
    fn assert_two_decimals(svg: &str) {
        for tok in svg.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
            if let Some((_, frac)) = tok.split_once('.') {
                assert!(frac.len() <= 2, "too many decimals: {tok}");
            }
        }
    }

    #[test]
    fn sample_has_no_text_or_fonts_and_is_well_formed() {
        let svg = render_sample();
        assert!(!svg.contains("<text") && !svg.to_lowercase().contains("font"));
        assert_well_formed(&svg);
        assert_two_decimals(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 7 + 1, "validation markers plus legend marker");
        if let Ok(path) = std::env::var("CURVE_SVG_OUT") {
            std::fs::write(path, &svg).unwrap();
        }
    }

    #[test]
    fn deterministic() {
        assert_eq!(render_sample(), render_sample());
    }

    #[test]
    fn non_finite_points_break_the_line() {
        let pts = [(0.0, 1.0), (1.0, 0.9), (2.0, f64::NAN), (3.0, 0.7), (4.0, f64::INFINITY), (f64::NAN, 1.0), (5.0, 0.5), (6.0, 0.4)];
        let svg = render("nan", &[Series { label: "a<b", points: &pts, color: "#1f77b4\" x='&" }]);
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(r#"<circle cx="#), "the isolated point at step 3 gets a marker");
        assert!(!svg.contains("NaN") && !svg.contains("inf") && svg.contains("#1f77b4&quot; x=&apos;&amp;"));
    }

    #[test]
    fn empty_input_draws_axes_and_no_data() {
        let nan = [(f64::NAN, f64::NAN)];
        let (empty, all_nan) = (Series { label: "train", points: &[], color: "#000" }, Series { label: "x", points: &nan, color: "red" });
        for series in [&[][..], &[empty], &[empty, all_nan]] {
            let svg = render("", series);
            assert_well_formed(&svg);
            assert!(!svg.contains("<polyline") && !svg.contains("<circle") && !svg.contains("<text"));
            assert!(svg.contains("fill=\"none\" stroke=\"#8c8c8c\""), "no data label drawn");
        }
    }

    #[test]
    fn single_point_and_constant_values() {
        let one = [(7.0, 2.5)];
        let svg = render("one", &[Series { label: "train", points: &one, color: "#1f77b4" }]);
        assert_well_formed(&svg);
        assert!(svg.contains("<circle") && !svg.contains("<polyline"));
        let (lo, hi) = view_limits(2.5, 2.5, false);
        assert!(lo < 2.5 && hi > 2.5);
        let (lo, hi) = view_limits(0.0, 0.0, false);
        assert!(make_axis(lo, hi, false, |t, _| t.len() <= 8).ticks.len() >= 3);
        let flat: Vec<(f64, f64)> = (0..50).map(|s| (s as f64, 1.0)).collect();
        assert_well_formed(&render("flat", &[Series { label: "", points: &flat, color: "#1f77b4" }]));
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick_labels(&[0.0, 2e-5, 4e-5], 2e-5), ["0", "2e-05", "4e-05"]);
        assert_eq!(tick_labels(&[1.2e6, 1.4e6], 2e5), ["1.2e+06", "1.4e+06"]);
        assert_eq!(tick_labels(&[12000.0, 14000.0], 2000.0), ["12000", "14000"]);
        assert_eq!(tick_labels(&[0.5, 1.0, 1.5], 0.5), ["0.5", "1.0", "1.5"]);
        assert_eq!(tick_labels(&[1.2, 1.25, 1.3], 0.05), ["1.20", "1.25", "1.30"]);
        assert_eq!(tick_labels(&[-0.0, 0.1], 0.1), ["0.0", "0.1"]);
        let (lo, hi) = view_limits(0.0, 3.0, true);
        let x = make_axis(lo, hi, true, |t, _| t.len() <= 10);
        assert!(x.labels.iter().all(|l| !l.contains('.')), "{:?}", x.labels);
        let (lo, hi) = view_limits(1.0, 300.0, true);
        assert_eq!(make_axis(lo, hi, true, |t, _| t.len() <= 8).labels, ["0", "50", "100", "150", "200", "250", "300"]);
    }
}
