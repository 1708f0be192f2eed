//! `swift bench eval`: questions per second of 5-shot MMLU-style scoring
//! (prompts of about 600 tokens) on CPU with a Qwen2.5-0.5B-shaped model
//! (random weights), three ways in the same run: swift as the eval stage runs
//! (shared prefix computed once, questions packed into rows), swift with
//! neither (one question per forward pass), and transformers scoring one
//! question per forward pass over the whole prompt, as lm-eval's HF backend
//! does (`--python`, scripts/bench_eval_transformers.py).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use swift_stages::eval::data;
use swift_stages::eval::prompt::{Template, TemplateName};
use swift_stages::eval::score::ScoreOptions;
use swift_stages::eval::suites::Suite;
use swift_stages::eval::{PromptOptions, ScoringModel};
use swift_stages::llm::Compute;
use swift_stages::model_source::OpenedModel;

use super::bench::{cpu_model, num_cores, timed, xorshift};
use super::bench_finetune::{write_model, LARGE};
use super::Exit;

/// Arguments of `swift bench eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Work folder (the model and data are generated once and reused).
    #[arg(long, default_value = "bench-work/eval")]
    dir: PathBuf,
    /// Scored questions (one subject).
    #[arg(long, default_value_t = 24)]
    questions: usize,
    /// Decoder layers of the generated model (24 is Qwen2.5-0.5B's).
    #[arg(long, default_value_t = 24)]
    layers: usize,
    /// Words per generated question (sets the prompt length).
    #[arg(long, default_value_t = 9)]
    words: usize,
    /// Tokens per packed row for swift's default scorer.
    #[arg(long, default_value_t = swift_stages::eval::score::ROW_TOKENS)]
    row_tokens: usize,
    /// A Python with transformers (e.g. .venv/bin/python) to score the same
    /// questions side by side.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The device swift scores on: `cpu`, `cuda:N`, or `auto`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

const WORDS: [&str; 24] = [
    "court", "statute", "penalty", "river", "contract", "judge", "appeal", "fine", "years", "law", "clause", "tax",
    "market", "energy", "theory", "model", "value", "system", "number", "state", "example", "policy", "river", "city",
];

/// Writes `data/{dev,test}/bench_subject_{split}.csv` in MMLU's layout.
fn write_data(root: &Path, questions: usize, words: usize) -> anyhow::Result<()> {
    let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
    let mut sentence = |n: usize| -> String {
        (0..n).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
    };
    for (split, rows) in [("dev", 5), ("test", questions)] {
        let dir = root.join("data").join(split);
        std::fs::create_dir_all(&dir)?;
        let mut writer = csv::WriterBuilder::new().has_headers(false).from_path(dir.join(format!("bench_subject_{split}.csv")))?;
        for i in 0..rows {
            let question = format!("{}?", sentence(words));
            let options: Vec<String> = (0..4).map(|_| sentence(2)).collect();
            let answer = ["A", "B", "C", "D"][i % 4];
            writer.write_record([question.as_str(), &options[0], &options[1], &options[2], &options[3], answer])?;
        }
        writer.flush()?;
    }
    Ok(())
}

pub fn exec(args: EvalArgs) -> anyhow::Result<Exit> {
    std::fs::create_dir_all(&args.dir)?;
    let root = args.dir.canonicalize()?;
    let shape = LARGE.with_layers(args.layers);
    let model_dir = write_model(&root.join(format!("models/{}-layers", args.layers)), &shape)?;
    let data_dir = root.join(format!("data-{}q-{}w", args.questions, args.words));
    write_data(&data_dir, args.questions, args.words)?;
    outln!("machine: {} ({} cores)", cpu_model(), num_cores());
    outln!("model: {} with {} layers (random bf16 weights); 5-shot lm-eval MMLU prompts\n", LARGE.name, args.layers);

    let compute = Compute::parse(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let started = Instant::now();
    let model = ScoringModel::load(&OpenedModel { folder: model_dir.clone(), adapters: Vec::new() }, compute)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let subjects = data::load(&data_dir, Suite::Mmlu, &[], None)?;
    let template = Template::of(TemplateName::LmEval, Suite::Mmlu);
    let prompts = PromptOptions { shots: 5, chat: false };
    let tokens = model.prompt_tokens(Suite::Mmlu, &template, prompts, &subjects[0])?;
    let mean_tokens = tokens.iter().sum::<usize>() as f64 / tokens.len() as f64;
    outln!("{} questions, prompts of {mean_tokens:.0} tokens on average; model loaded in {load_seconds:.1} s\n", args.questions);

    let mut rows = Vec::new();
    let mut choices = Vec::new();
    for (label, options) in [
        ("swift: shared prefix once + packed rows", ScoreOptions { reuse_prefix: true, row_tokens: args.row_tokens }),
        ("swift: one question per pass, no prefix reuse", ScoreOptions { reuse_prefix: false, row_tokens: 1 }),
    ] {
        let started = Instant::now();
        let results = model.score_suite(Suite::Mmlu, &template, prompts, &subjects, options, &|| false)?;
        let seconds = started.elapsed().as_secs_f64();
        choices.push(results[0].questions.iter().map(|q| q.choice.clone()).collect::<Vec<_>>());
        rows.push((label.to_string(), seconds));
    }
    drop(model);
    if let Some(python) = &args.python {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_eval_transformers.py");
        let mut cmd = Command::new(python);
        cmd.arg(script).arg("--model").arg(&model_dir).arg("--data").arg(&data_dir).args(["--threads", &num_cores().to_string()]);
        let (_, stdout) = timed(&mut cmd)?;
        let out: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
        let peer: Vec<String> = out["choices"].as_array().map(|c| c.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
        let agree = peer.iter().zip(&choices[0]).filter(|(a, b)| a == b).count();
        outln!("transformers chose the same letter as swift for {agree}/{} questions\n", peer.len());
        rows.push(("transformers: one question per forward pass".to_string(), out["seconds"].as_f64().unwrap_or(f64::NAN)));
    }
    let peer = rows.last().map(|r| r.1).unwrap_or(f64::NAN);
    outln!("| scorer | wall time | questions/s | vs last row |\n|---|---:|---:|---:|");
    for (label, seconds) in &rows {
        outln!("| {label} | {seconds:.1} s | {:.2} | {:.2}× |", args.questions as f64 / seconds, peer / seconds);
    }
    Ok(Exit::Success)
}
