//! `swift generate`: try a model — a model folder, or any stage of a manifest
//! that yields one — on a prompt.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use swift_engine::kind::OutputType;
use swift_engine::pipeline::{InputRef, NodeInput};
use swift_engine::status::assess;
use swift_stages::llm::chat::Message;
use swift_stages::llm::generate::{Finish, GenerateOptions};
use swift_stages::llm::scheduler::{generate_all, BatchLimits, Request};
use swift_stages::llm::adapter::PeftAdapter;
use swift_stages::llm::{Compute, ModelConfig, TextTokenizer};
use swift_stages::model_source::{OpenedModel, WeightsAs};

use super::{open_store, Exit, ManifestArgs};

/// Arguments of `swift generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, or MANIFEST:STAGE for a stage that yields a model.
    #[arg(long, value_name = "PATH_OR_STAGE")]
    model: String,
    /// The prompt.
    #[arg(long, required_unless_present = "prompt_file", conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Prompts to decode together, one per line; a `.jsonl` file holds one
    /// JSON object per line, `{"messages": [...]}` (rendered with the chat
    /// template) or `{"prompt": "..."}`. Prints one JSON object per prompt.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// With --prompt-file: sequences decoded at once at most (the others
    /// join as sequences end).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Wrap the prompt in the model's chat template (as a user message).
    #[arg(long)]
    chat: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute dtype: f32, bf16 or f16 (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    dtype: Option<String>,
    /// The device: `auto` (a GPU if this build has CUDA and one opens, else
    /// the CPU), `cpu` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print one JSON object on stdout's last line: {"prompt_ids", "new_ids", "text"}.
    #[arg(long)]
    json: bool,
}

pub fn exec(cache: Option<PathBuf>, offline: bool, args: Args) -> anyhow::Result<Exit> {
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        eprintln!("error: --top-p must be in (0, 1]");
        return Ok(Exit::Invalid);
    }
    if args.temperature < 0.0 {
        eprintln!("error: --temperature must be 0 (greedy) or positive");
        return Ok(Exit::Invalid);
    }
    let opened = match resolve_model(cache.as_deref(), offline, &args.model)? {
        Ok(opened) => opened,
        Err(exit) => return Ok(exit),
    };
    let folder = &opened.folder;
    let compute = match Compute::parse(&args.device) {
        Ok(compute) => compute,
        Err(e) => {
            eprintln!("error: --device {}: {e}", args.device);
            return Ok(Exit::Invalid);
        }
    };
    let device = compute.open()?;
    let dtype = match args.dtype.as_deref() {
        None => compute.dtype(),
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => {
            eprintln!("error: --dtype {other}: use f32, bf16 or f16");
            return Ok(Exit::Invalid);
        }
    };
    let config = ModelConfig::load(folder)?;
    let tokenizer = TextTokenizer::load(folder, &config)?;
    let model = opened.load(dtype, &device, WeightsAs::Stored)?;
    let options = GenerateOptions { max_tokens: args.max_tokens, temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    let Some(prompt) = &args.prompt else {
        let file = args.prompt_file.as_deref().expect("clap requires --prompt or --prompt-file");
        let prompts = super::generate_file::read_prompts(file, &tokenizer, folder, args.chat)?;
        super::generate_file::run(&model, &tokenizer, &prompts, &options, args.batch_size)?;
        return Ok(Exit::Success);
    };
    let prompt_ids = encode_prompt(&tokenizer, folder, prompt, args.chat)?;
    let mut printed = String::new();
    let mut so_far = Vec::new();
    // The batch decoder with one sequence: its block cache grows in place
    // (the reference `generate` re-concatenates its cache at every token).
    let request = Request { prompt: prompt_ids.clone(), options };
    let (mut generations, _) = generate_all(&model, &[request], tokenizer.eos_ids(), BatchLimits::default(), |_, id| {
        if args.json {
            return;
        }
        so_far.push(id);
        // Print the text as it grows. Decoding whole prefixes keeps multi-byte
        // characters intact; a prefix ending inside one (U+FFFD) waits.
        if let Ok(text) = tokenizer.decode(&so_far, true) {
            if !text.ends_with('\u{FFFD}') && text.starts_with(printed.as_str()) {
                out!("{}", &text[printed.len()..]);
                let _ = crate::output::Stdout.flush();
                printed = text;
            }
        }
    })?;
    let generation = generations.pop().expect("one request, one generation");
    let new_ids = generation.ids;
    let text = tokenizer.decode(&new_ids, true)?;
    if generation.finish == Finish::Context {
        eprintln!(
            "note: stopped after {} new tokens: prompt and answer fill the model's context ({} tokens)",
            new_ids.len(),
            model.config().max_position_embeddings
        );
    }
    if args.json {
        let finish_reason = generation.finish.reason();
        outln!("{}", serde_json::json!({"prompt_ids": prompt_ids, "new_ids": new_ids, "text": text, "finish_reason": finish_reason}));
    } else {
        // Whatever was held back (or could not be printed as a continuation).
        let shared = text.char_indices().map(|(i, c)| i + c.len_utf8()).take_while(|&end| printed.get(..end) == text.get(..end)).last().unwrap_or(0);
        if shared < printed.len() {
            outln!();
            outln!("{text}");
        } else {
            outln!("{}", &text[shared..]);
        }
    }
    Ok(Exit::Success)
}

/// A prompt's ids: wrapped as a user message in the chat template with
/// `chat`, else as transformers' `tokenizer(prompt)` gives them.
pub(super) fn encode_prompt(tokenizer: &TextTokenizer, folder: &Path, prompt: &str, chat: bool) -> anyhow::Result<Vec<u32>> {
    if !chat {
        return Ok(tokenizer.encode(prompt)?);
    }
    encode_chat(tokenizer, folder, &[Message { role: "user".into(), content: prompt.to_string() }])
}

/// Messages rendered with the chat template and its generation prompt.
pub(super) fn encode_chat(tokenizer: &TextTokenizer, folder: &Path, messages: &[Message]) -> anyhow::Result<Vec<u32>> {
    let template = tokenizer.chat_template()?.with_context(|| {
        format!("{} has no chat template (tokenizer_config.json or chat_template.jinja); drop --chat", folder.display())
    })?;
    Ok(tokenizer.encode_rendered(&template.render(&messages, None::<&()>, true)?)?)
}

/// The model `--model` names: a model folder, or `MANIFEST:STAGE` for a
/// stage that yields one (`download`, `quantize`), a fine-tune (its base with
/// every adapter of its chain, merged in memory as eval loads it) or an
/// export (its `merged` folder, else its `awq` one). `Err(exit)` after
/// printing why not.
fn resolve_model(cache: Option<&Path>, offline: bool, spec: &str) -> anyhow::Result<Result<OpenedModel, Exit>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Ok(OpenedModel { folder: path.to_path_buf(), adapters: Vec::new() }));
    }
    let Some((manifest, stage)) = spec.rsplit_once(':') else {
        bail!("--model {spec}: not a folder; give a model folder or MANIFEST:STAGE");
    };
    let args = ManifestArgs { manifest: PathBuf::from(manifest), sets: Vec::new(), device: None };
    let pipeline = match args.compile() {
        Ok(pipeline) => pipeline,
        Err(error) => return Ok(Err(super::invalid(&error, false))),
    };
    let index = match pipeline.require(stage) {
        Ok(index) => index,
        Err(message) => {
            eprintln!("error: {message}");
            return Ok(Err(Exit::Invalid));
        }
    };
    let node = &pipeline.nodes[index];
    let yields = |ty: OutputType| node.plan.outputs().into_iter().find(|o| o.ty == ty).map(|o| o.name);
    let (model, adapter, export) = (yields(OutputType::Model), yields(OutputType::Adapter), yields(OutputType::Export));
    if model.is_none() && adapter.is_none() && export.is_none() {
        eprintln!("error: stage `{stage}` ({}) does not yield a model", node.kind);
        return Ok(Err(Exit::Invalid));
    }
    let store = open_store(cache, &pipeline.manifest.root)?;
    let _guard = store.read_guard()?;
    let stats = store.stat_cache();
    let assessments = assess(&pipeline, &store, &stats, false, offline)?;
    let output_of = |i: usize, output: &str| -> anyhow::Result<PathBuf> {
        match &assessments[i].cached {
            Some((_, paths)) => Ok(paths[output].clone()),
            None => {
                let name = &pipeline.nodes[i].name;
                bail!("stage `{name}` is not in the cache yet; run `swift run {manifest} --only {name}` first")
            }
        }
    };
    if let Some(output) = model {
        return Ok(Ok(OpenedModel { folder: output_of(index, output)?, adapters: Vec::new() }));
    }
    if let Some(output) = export {
        let folder = output_of(index, output)?;
        let Some(model) = ["merged", "awq"].iter().map(|f| folder.join(f)).find(|f| f.join("config.json").is_file()) else {
            bail!("export `{stage}` has no model folder (its formats have neither `merged` nor `awq`): add one, or pass --model with a folder");
        };
        return Ok(Ok(OpenedModel { folder: model, adapters: Vec::new() }));
    }
    // A fine-tune: its inputs are the chain's base (`model`) and the adapters
    // before its own (`adapter.0`, …), base-most first.
    let input_path = |input: &NodeInput| match &input.source {
        InputRef::Stage { stage, output } => output_of(*stage, output),
        InputRef::Local { path, .. } => Ok(path.clone()),
    };
    let base = node.inputs.iter().find(|i| i.name == "model").context("a fine-tune stage without a model input")?;
    let mut adapters = Vec::new();
    for input in node.inputs.iter().filter(|i| i.name.starts_with("adapter.")) {
        adapters.push(PeftAdapter::open(&input_path(input)?)?);
    }
    adapters.push(PeftAdapter::open(&output_of(index, adapter.expect("a fine-tune yields an adapter"))?)?);
    Ok(Ok(OpenedModel { folder: input_path(base)?, adapters }))
}
