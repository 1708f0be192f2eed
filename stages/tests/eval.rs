//! Eval scoring against independent references on the tiny fixture models and
//! the MMLU/C-Eval fixtures (tests/fixtures/eval/make_eval_fixtures.py):
//! lm-evaluation-harness 0.4.13 itself for the `lm-eval` template (also with
//! its chat template mode), and transformers for `official`
//! (tests/fixtures/eval/make_eval_reference.py).
//! Prompts must match exactly, choices for at least 99% of questions, and
//! log-likelihoods within 1e-3.

use std::path::PathBuf;

use serde::Deserialize;
use swift_stages::eval::data::{self, Subject};
use swift_stages::eval::prompt::{Template, TemplateName};
use swift_stages::eval::report::SubjectResult;
use swift_stages::eval::score::ScoreOptions;
use swift_stages::eval::suites::Suite;
use swift_stages::eval::{PromptOptions, ScoringModel};
use swift_stages::model_source::OpenedModel;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// One line of a reference file.
#[derive(Debug, Deserialize)]
struct Reference {
    subject: String,
    index: usize,
    prompt: String,
    loglikelihoods: Vec<f64>,
    choice: String,
    answer: String,
}

fn references(template: &str, model: &str, suite: Suite) -> Vec<Reference> {
    let path = fixtures().join(format!("eval/reference/{template}/{model}/{}.jsonl", suite.name()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn model(name: &str) -> ScoringModel {
    let opened = OpenedModel { folder: fixtures().join("models").join(name), adapters: Vec::new() };
    ScoringModel::load(&opened, swift_stages::llm::Compute::Cpu).unwrap()
}

fn subjects(suite: Suite, layout: &str) -> Vec<Subject> {
    data::load(&fixtures().join("eval").join(layout), suite, &[], None).unwrap()
}

fn score(model: &ScoringModel, suite: Suite, template: &Template, subjects: &[Subject], options: ScoreOptions) -> Vec<SubjectResult> {
    score_with(model, suite, template, subjects, options, false)
}

fn score_with(model: &ScoringModel, suite: Suite, template: &Template, subjects: &[Subject], options: ScoreOptions, chat: bool)
    -> Vec<SubjectResult> {
    let prompts = PromptOptions { shots: 5, chat };
    model.score_suite(suite, template, prompts, subjects, options, &|| false).unwrap()
}

/// Compares prompts, choices and log-likelihoods with a reference file.
fn check_against(reference: &str, name: TemplateName, model_name: &str, suite: Suite, layout: &str) {
    check_with(reference, name, model_name, suite, layout, false)
}

fn check_with(reference: &str, name: TemplateName, model_name: &str, suite: Suite, layout: &str, chat: bool) {
    let model = model(model_name);
    let subjects = subjects(suite, layout);
    let template = Template::of(name, suite);
    let results = score_with(&model, suite, &template, &subjects, ScoreOptions::default(), chat);
    let expected = references(reference, model_name, suite);
    let mut checked = 0;
    let mut same_choice = 0;
    let mut worst: f64 = 0.0;
    for r in &expected {
        let subject = subjects.iter().find(|s| s.handle == r.subject).expect("subject in the fixture");
        let q = subject.scored.iter().find(|q| q.row == r.index).expect("question in the fixture");
        let prompt = model.prompt(suite, &template, chat, subject, 5, q).unwrap();
        assert_eq!(prompt, r.prompt, "{model_name} {} {} #{}: prompt differs", suite.name(), r.subject, r.index);
        let got = results.iter().find(|s| s.handle == r.subject).unwrap().questions.iter().find(|x| x.index == r.index).unwrap();
        assert_eq!(got.answer, r.answer);
        for (a, b) in got.loglikelihoods.iter().zip(&r.loglikelihoods) {
            worst = worst.max((a - b).abs());
        }
        same_choice += usize::from(got.choice == r.choice);
        checked += 1;
    }
    let total: usize = results.iter().map(|s| s.questions.len()).sum();
    assert_eq!(checked, total, "every scored question has a reference line");
    assert!(checked > 0);
    assert!(worst < 1e-3, "{reference} {model_name} {}: log-likelihoods differ by up to {worst}", suite.name());
    assert!(same_choice * 100 >= checked * 99, "{reference} {model_name} {}: {same_choice}/{checked} choices agree", suite.name());
}

#[test]
fn lm_eval_template_matches_lm_evaluation_harness_on_mmlu() {
    for model in ["qwen2-tiny", "llama-tiny"] {
        check_against("lm-eval", TemplateName::LmEval, model, Suite::Mmlu, "mmlu");
    }
}

#[test]
fn lm_eval_template_matches_lm_evaluation_harness_on_ceval() {
    for model in ["qwen2-tiny", "llama-tiny"] {
        check_against("lm-eval", TemplateName::LmEval, model, Suite::Ceval, "ceval");
    }
}

#[test]
fn chat_prompts_match_lm_evaluation_harness_apply_chat_template() {
    // lm-eval 0.4.13 with apply_chat_template (fewshot_as_multiturn off): the
    // header as the system message, shots and question as one user message.
    for suite in Suite::ALL {
        check_with("lm-eval-chat", TemplateName::LmEval, "qwen2-tiny", suite, suite.name(), true);
    }
}

#[test]
fn official_template_matches_transformers() {
    for model in ["qwen2-tiny", "llama-tiny"] {
        check_against("official", TemplateName::Official, model, Suite::Mmlu, "mmlu");
        check_against("official", TemplateName::Official, model, Suite::Ceval, "ceval");
    }
}

#[test]
fn parquet_layouts_read_the_same_questions_as_the_csv_files() {
    for (suite, csv, parquet) in [(Suite::Mmlu, "mmlu", "mmlu-parquet"), (Suite::Ceval, "ceval", "ceval-parquet")] {
        let (a, b) = (subjects(suite, csv), subjects(suite, parquet));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.handle, y.handle);
            assert_eq!(x.dev, y.dev, "{} dev", x.handle);
            assert_eq!(x.scored, y.scored, "{} {}", x.handle, suite.scored_split());
        }
    }
}

#[test]
fn prefix_reuse_and_packing_give_the_numbers_of_one_question_per_pass() {
    let model = model("qwen2-tiny");
    for suite in Suite::ALL {
        let subjects = subjects(suite, suite.name());
        let template = Template::of(TemplateName::LmEval, suite);
        let fast = score(&model, suite, &template, &subjects, ScoreOptions::default());
        let plain = score(&model, suite, &template, &subjects, ScoreOptions { reuse_prefix: false, row_tokens: 1 });
        for (f, p) in fast.iter().zip(&plain) {
            for (a, b) in f.questions.iter().zip(&p.questions) {
                assert_eq!(a.choice, b.choice);
                for (x, y) in a.loglikelihoods.iter().zip(&b.loglikelihoods) {
                    assert!((x - y).abs() < 1e-4, "{} #{}: {x} vs {y}", f.handle, a.index);
                }
            }
        }
    }
}

#[test]
fn shots_are_what_the_subject_has_and_what_fits_the_context() {
    let model = model("qwen2-tiny");
    let suite = Suite::Mmlu;
    let template = Template::of(TemplateName::LmEval, suite);
    let mut subjects = subjects(suite, "mmlu");
    subjects.truncate(2);
    // A subject with two dev rows gets two shots.
    subjects[0].dev.truncate(2);
    // Long dev rows: five shots would pass the model's 512 positions.
    for q in &mut subjects[1].dev {
        q.question = q.question.repeat(12);
    }
    let results = score(&model, suite, &template, &subjects, ScoreOptions::default());
    assert_eq!((results[0].shots, results[0].dev_rows), (2, 2));
    assert_eq!(results[0].first_prompt.matches("\nAnswer: ").count(), 2);
    assert!(results[1].shots < 5, "{}", results[1].shots);
    assert_eq!(results[1].truncated, 0);
    for r in &results {
        let encoded = model.prompt_tokens(suite, &template, PromptOptions { shots: 5, chat: false }, subjects.iter().find(|s| s.handle == r.handle).unwrap()).unwrap();
        // Context and the first of the two continuation tokens are fed.
        assert!(encoded.iter().all(|&n| n < 512), "{encoded:?}");
    }
}
