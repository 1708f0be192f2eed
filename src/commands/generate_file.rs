//! `swift generate --prompt-file`: every prompt of a file decoded together on
//! the batch decoder, one JSON object per prompt on stdout, in file order.
//!
//! A `.jsonl` file holds one object per line: `{"messages": [...]}` (OpenAI's
//! chat messages, rendered with the model's template and its generation
//! prompt) or `{"prompt": "..."}` (as `--prompt`). Any other file holds one
//! plain prompt per line. Blank lines are skipped; results say which line
//! they answer.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use swift_stages::llm::chat::Message;
use swift_stages::llm::generate::{check_prompt, GenerateOptions};
use swift_stages::llm::scheduler::{generate_all, BatchLimits, Request};
use swift_stages::llm::{Decoder, TextTokenizer};

/// One prompt of the file.
pub struct FilePrompt {
    /// Its line, from 1.
    line: usize,
    ids: Vec<u32>,
}

/// A `.jsonl` line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPrompt {
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
}

/// Reads and tokenizes every prompt of `file` (`chat` wraps plain prompts as
/// a user message); errors name the file and line.
pub fn read_prompts(file: &Path, tokenizer: &TextTokenizer, folder: &Path, chat: bool) -> anyhow::Result<Vec<FilePrompt>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("--prompt-file {}", file.display()))?;
    let jsonl = file.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", file.display(), i + 1);
        let ids = if jsonl {
            let row: JsonPrompt = serde_json::from_str(line).with_context(|| format!("{}: not a prompt object", at()))?;
            match (row.messages, row.prompt) {
                (Some(messages), None) => super::generate::encode_chat(tokenizer, folder, &messages),
                (None, Some(prompt)) => super::generate::encode_prompt(tokenizer, folder, &prompt, chat),
                _ => bail!("{}: give \"messages\" or \"prompt\", one of them", at()),
            }
        } else {
            super::generate::encode_prompt(tokenizer, folder, line, chat)
        }
        .with_context(at)?;
        prompts.push(FilePrompt { line: i + 1, ids });
    }
    if prompts.is_empty() {
        bail!("--prompt-file {}: no prompt in it", file.display());
    }
    Ok(prompts)
}

/// Decodes every prompt at once (at most `batch_size` sequences together)
/// and prints one JSON line each: `line`, `prompt_ids`, `new_ids`, `text`,
/// `finish_reason`.
pub fn run(model: &Decoder, tokenizer: &TextTokenizer, prompts: &[FilePrompt], options: &GenerateOptions, batch_size: usize)
    -> anyhow::Result<()> {
    for prompt in prompts {
        check_prompt(model, &prompt.ids).map_err(|e| anyhow!("line {}: {e}", prompt.line))?;
    }
    let requests: Vec<Request> = prompts.iter().map(|p| Request { prompt: p.ids.clone(), options: options.clone() }).collect();
    let limits = BatchLimits { max_seqs: batch_size.max(1), ..BatchLimits::default() };
    let (generations, _) = generate_all(model, &requests, tokenizer.eos_ids(), limits, |_, _| {})?;
    for (prompt, generation) in prompts.iter().zip(generations) {
        let text = tokenizer.decode(&generation.ids, true)?;
        outln!(
            "{}",
            serde_json::json!({
                "line": prompt.line,
                "prompt_ids": prompt.ids,
                "new_ids": generation.ids,
                "text": text,
                "finish_reason": generation.finish.reason(),
            })
        );
    }
    Ok(())
}
