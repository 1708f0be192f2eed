//! What an eval stage writes: each model × suite part's raw results
//! (`results.json`), and the stage's report folder:
//!
//! - `scores.json`: accuracy (0–1) per model × suite: `micro` (all questions
//!   equally: the headline, lm-eval's `weight_by_size`), `macro` (mean of
//!   subject accuracies), per category (micro within it), per subject; plus
//!   the settings and each suite's template strings and first prompt;
//! - `predictions.jsonl`: one line per model × question, ordered by model,
//!   suite, subject, index;
//! - `scores.md`: the models side by side, with deltas against the first;
//! - `scores.svg`: a bar chart of the micro accuracies.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::suites::Suite;
use crate::svg::{num, text_element, text_path, text_width, INK};

/// One scored question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionResult {
    /// 0-based data row in the split file.
    pub index: usize,
    /// The correct letter.
    pub answer: String,
    /// The letter with the highest log-likelihood.
    pub choice: String,
    /// Summed log-likelihoods of A–D.
    pub loglikelihoods: Vec<f64>,
}

/// One subject's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubjectResult {
    /// The subject handle.
    pub handle: String,
    /// The fewest shots a question got (fewer than asked where the subject has
    /// fewer dev rows, or where a prompt would not fit the model's context).
    pub shots: usize,
    /// Dev rows the subject has.
    pub dev_rows: usize,
    /// Questions cut from the left because even a 0-shot prompt is too long.
    pub truncated: usize,
    /// The first question's prompt, exactly as scored (chat template included).
    pub first_prompt: String,
    /// The scored questions, in file order.
    pub questions: Vec<QuestionResult>,
}

impl SubjectResult {
    fn correct(&self) -> usize {
        self.questions.iter().filter(|q| q.choice == q.answer).count()
    }
}

/// One model's results on every suite.
#[derive(Clone, Debug)]
pub struct ModelScores {
    /// The model as `models` names it.
    pub model: String,
    /// Subjects by suite.
    pub suites: BTreeMap<Suite, Vec<SubjectResult>>,
}

/// Accuracies of one model on one suite.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Accuracy {
    /// All questions weighted equally (the headline).
    pub micro: f64,
    /// The mean of the subjects' accuracies.
    #[serde(rename = "macro")]
    pub macro_: f64,
    /// Questions scored.
    pub questions: usize,
    /// Per category, micro within the category (alphabetical here; `scores.md`
    /// lists them in the subject table's order).
    pub categories: BTreeMap<String, f64>,
    /// Per subject.
    pub subjects: BTreeMap<String, f64>,
}

/// Aggregates one suite's subjects.
pub fn accuracy(suite: Suite, subjects: &[SubjectResult]) -> Accuracy {
    let table = suite.table();
    let mut by_category: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut correct, mut total, mut subject_sum) = (0, 0, 0.0);
    let mut per_subject = BTreeMap::new();
    for s in subjects {
        let (c, n) = (s.correct(), s.questions.len());
        let entry = by_category.entry(table.category(&s.handle).to_string()).or_default();
        entry.0 += c;
        entry.1 += n;
        correct += c;
        total += n;
        let acc = ratio(c, n);
        subject_sum += acc;
        per_subject.insert(s.handle.clone(), acc);
    }
    Accuracy {
        micro: ratio(correct, total),
        macro_: if subjects.is_empty() { 0.0 } else { subject_sum / subjects.len() as f64 },
        questions: total,
        categories: by_category.into_iter().map(|(k, (c, n))| (k, ratio(c, n))).collect(),
        subjects: per_subject,
    }
}

fn ratio(correct: usize, total: usize) -> f64 {
    if total == 0 { 0.0 } else { correct as f64 / total as f64 }
}

/// Writes one part's results.
pub fn write_part(dir: &Path, subjects: &[SubjectResult]) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_vec(subjects)?).with_context(|| format!("writing {}", path.display()))
}

/// Reads a part written by [`write_part`].
pub fn read_part(dir: &Path) -> anyhow::Result<Vec<SubjectResult>> {
    let path = dir.join("results.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
}

/// Writes the report folder; returns the run-summary metrics
/// (`{suite}.{model}` = micro accuracy).
pub fn write(dir: &Path, settings: &serde_json::Value, models: &[ModelScores])
    -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let suites: Vec<Suite> = models.first().map(|m| m.suites.keys().copied().collect()).unwrap_or_default();
    let accuracies: Vec<BTreeMap<Suite, Accuracy>> =
        models.iter().map(|m| m.suites.iter().map(|(&s, subjects)| (s, accuracy(s, subjects))).collect()).collect();

    let mut scores = serde_json::Map::new();
    for (m, acc) in models.iter().zip(&accuracies) {
        let per_suite: BTreeMap<&str, &Accuracy> = acc.iter().map(|(s, a)| (s.name(), a)).collect();
        scores.insert(m.model.clone(), serde_json::to_value(per_suite)?);
    }
    let prompts: serde_json::Map<String, serde_json::Value> = models
        .first()
        .map(|m| {
            m.suites
                .iter()
                .map(|(s, subjects)| {
                    let shots: BTreeMap<&str, usize> = subjects.iter().map(|x| (x.handle.as_str(), x.shots)).collect();
                    let first = subjects.first().map(|x| x.first_prompt.clone()).unwrap_or_default();
                    let truncated: usize = subjects.iter().map(|x| x.truncated).sum();
                    (s.name().to_string(), serde_json::json!({ "first_prompt": first, "shots": shots, "truncated": truncated }))
                })
                .collect()
        })
        .unwrap_or_default();
    let json = serde_json::json!({
        "settings": settings,
        "models": models.iter().map(|m| m.model.clone()).collect::<Vec<_>>(),
        "prompts": prompts,
        "scores": scores,
    });
    write_file(&dir.join("scores.json"), &(serde_json::to_string_pretty(&json)? + "\n"))?;

    let mut lines = String::new();
    for m in models {
        for (suite, subjects) in &m.suites {
            for s in subjects {
                for q in &s.questions {
                    let line = serde_json::json!({
                        "model": m.model, "suite": suite.name(), "subject": s.handle, "index": q.index,
                        "choice": q.choice, "answer": q.answer, "loglikelihoods": q.loglikelihoods,
                    });
                    lines.push_str(&serde_json::to_string(&line)?);
                    lines.push('\n');
                }
            }
        }
    }
    write_file(&dir.join("predictions.jsonl"), &lines)?;
    write_file(&dir.join("scores.md"), &markdown(settings, models, &suites, &accuracies))?;
    let bars: Vec<(String, Vec<f64>)> =
        suites.iter().map(|s| (s.label().to_string(), accuracies.iter().map(|a| a[s].micro).collect())).collect();
    let names: Vec<&str> = models.iter().map(|m| m.model.as_str()).collect();
    write_file(&dir.join("scores.svg"), &bar_chart("Accuracy (micro)", &names, &bars))?;

    let mut metrics = serde_json::Map::new();
    for &suite in &suites {
        for (m, acc) in models.iter().zip(&accuracies) {
            let rounded = (acc[&suite].micro * 1e4).round() / 1e4;
            metrics.insert(format!("{}.{}", suite.name(), m.model), rounded.into());
        }
    }
    Ok(metrics)
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `45.2` or `45.2 (+1.3)` against the first model.
fn cell(value: f64, first: f64, is_first: bool) -> String {
    let pct = value * 100.0;
    if is_first {
        format!("{pct:.1}")
    } else {
        let delta = (value - first) * 100.0;
        let sign = if delta >= 0.05 { "+" } else if delta <= -0.05 { "−" } else { "±" };
        format!("{pct:.1} ({sign}{:.1})", delta.abs())
    }
}

fn markdown(settings: &serde_json::Value, models: &[ModelScores], suites: &[Suite], acc: &[BTreeMap<Suite, Accuracy>]) -> String {
    let template = settings.get("template").and_then(|t| t.as_str()).unwrap_or("lm-eval");
    let shots = settings.get("shots").and_then(|t| t.as_u64()).unwrap_or(5);
    let mut md = format!("# Eval scores ({shots}-shot, `{template}` template)\n\nAccuracy in %; deltas against `{}`.\n\n", models[0].model);
    let row = |md: &mut String, label: &str, get: &dyn Fn(&Accuracy) -> Option<f64>, suite: Suite| {
        let first = get(&acc[0][&suite]);
        let cells: Vec<String> = acc
            .iter()
            .enumerate()
            .map(|(i, a)| match (get(&a[&suite]), first) {
                (Some(v), Some(f)) => cell(v, f, i == 0),
                _ => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
    };
    let _ = writeln!(md, "| | {} |", models.iter().map(|m| format!("`{}`", m.model)).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(models.len()));
    for &suite in suites {
        let n = acc[0][&suite].questions;
        row(&mut md, &format!("**{}** (micro, {n} questions)", suite.label()), &|a| Some(a.micro), suite);
        row(&mut md, &format!("{} macro", suite.label()), &|a| Some(a.macro_), suite);
        let table = &suite.table().categories;
        let mut categories: Vec<&String> = acc[0][&suite].categories.keys().collect();
        categories.sort_by_key(|c| table.iter().position(|t| t == *c).unwrap_or(table.len()));
        for category in categories {
            row(&mut md, &format!("{} · {category}", suite.label()), &|a| a.categories.get(category).copied(), suite);
        }
    }
    for &suite in suites {
        let _ = writeln!(md, "\n## {} by subject\n", suite.label());
        let _ = writeln!(md, "| subject | {} |", models.iter().map(|m| format!("`{}`", m.model)).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(models.len()));
        for subject in acc[0][&suite].subjects.keys() {
            row(&mut md, subject, &|a| a.subjects.get(subject).copied(), suite);
        }
    }
    md
}

const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// A grouped bar chart (0–100 %): one group per label, one bar per model.
/// Text is stroked ([`crate::svg`]: no fonts needed).
fn bar_chart(title: &str, models: &[&str], groups: &[(String, Vec<f64>)]) -> String {
    let (w, h) = (640.0, 360.0);
    let cap = 9.0;
    let (left, right, top, bottom) = (48.0, 16.0, 40.0, 56.0);
    let (plot_w, plot_h) = (w - left - right, h - top - bottom);
    let y = |v: f64| top + plot_h * (1.0 - v.clamp(0.0, 1.0));
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#);
    svg.push('\n');
    let _ = writeln!(svg, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let mut text = String::new();
    text_path(&mut text, title, (w - text_width(title, cap * 1.3)) / 2.0, 24.0, cap * 1.3, false);
    for tick in 0..=5 {
        let v = tick as f64 / 5.0;
        let _ = writeln!(svg, r##"<path d="M{} {}H{}" stroke="#dddddd" stroke-width="1"/>"##, num(left), num(y(v)), num(w - right));
        let label = format!("{}", tick * 20);
        text_path(&mut text, &label, left - 6.0 - text_width(&label, cap), y(v) + cap / 2.0, cap, false);
    }
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / models.len().max(1) as f64;
    for (g, (label, values)) in groups.iter().enumerate() {
        let x0 = left + g as f64 * group_w + group_w * 0.1;
        for (m, &v) in values.iter().enumerate() {
            let x = x0 + m as f64 * bar_w;
            let color = COLORS[m % COLORS.len()];
            let _ = writeln!(svg, r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{color}"/>"#, num(x), num(y(v)), num(bar_w * 0.9), num(y(0.0) - y(v)));
            let pct = format!("{:.1}", v * 100.0);
            let small = (cap * 0.8).min(bar_w * 0.9 / text_width(&pct, 1.0).max(1e-9));
            text_path(&mut text, &pct, x + (bar_w * 0.9 - text_width(&pct, small)) / 2.0, y(v) - 3.0, small, false);
        }
        text_path(&mut text, label, left + g as f64 * group_w + (group_w - text_width(label, cap)) / 2.0, y(0.0) + cap + 6.0, cap, false);
    }
    let _ = writeln!(svg, r##"<path d="M{l} {t}V{b}H{r}" fill="none" stroke="{INK}" stroke-width="1"/>"##, l = num(left), t = num(top), b = num(y(0.0)), r = num(w - right));
    let mut x = left;
    for (m, name) in models.iter().enumerate() {
        let color = COLORS[m % COLORS.len()];
        let _ = writeln!(svg, r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{color}"/>"#, num(x), num(h - 20.0), num(cap), num(cap));
        text_path(&mut text, name, x + cap * 1.5, h - 20.0 + cap, cap, false);
        x += cap * 3.0 + text_width(name, cap);
    }
    text_element(&mut svg, &text, cap, INK);
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(handle: &str, outcomes: &[bool]) -> SubjectResult {
        let questions = outcomes
            .iter()
            .enumerate()
            .map(|(i, &ok)| QuestionResult { index: i, answer: "A".into(), choice: if ok { "A" } else { "B" }.into(), loglikelihoods: vec![0.0; 4] })
            .collect();
        SubjectResult { handle: handle.into(), shots: 5, dev_rows: 5, truncated: 0, first_prompt: String::new(), questions }
    }

    #[test]
    fn micro_weights_questions_and_macro_weights_subjects() {
        // abstract_algebra (STEM) 1/4, world_religions (Humanities) 2/2, college_physics (STEM) 0/2.
        let subjects = [
            subject("abstract_algebra", &[true, false, false, false]),
            subject("world_religions", &[true, true]),
            subject("college_physics", &[false, false]),
        ];
        let a = accuracy(Suite::Mmlu, &subjects);
        assert_eq!(a.questions, 8);
        assert!((a.micro - 3.0 / 8.0).abs() < 1e-12);
        assert!((a.macro_ - (0.25 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        assert!((a.categories["STEM"] - 1.0 / 6.0).abs() < 1e-12);
        assert_eq!(a.categories["Humanities"], 1.0);
        assert_eq!(a.subjects["world_religions"], 1.0);
    }

    #[test]
    fn cells_show_deltas_against_the_first_model() {
        assert_eq!(cell(0.452, 0.452, true), "45.2");
        assert_eq!(cell(0.465, 0.452, false), "46.5 (+1.3)");
        assert_eq!(cell(0.44, 0.452, false), "44.0 (−1.2)");
        assert_eq!(cell(0.452, 0.452, false), "45.2 (±0.0)");
    }
}
