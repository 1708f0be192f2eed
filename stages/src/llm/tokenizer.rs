//! A model folder's tokenizer: `tokenizer.json` through the `tokenizers` crate,
//! special tokens from `tokenizer_config.json`, the chat template from
//! `chat_template.jinja` (newer transformers) or `tokenizer_config.json`'s
//! `chat_template` key, and the ids that end generation (generation_config.json's
//! `eos_token_id`, else config.json's).

use std::path::Path;

use super::chat::ChatTemplate;
use super::config::{ModelConfig, TokenIds};
use super::LlmError;

/// A tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    eos_ids: Vec<u32>,
    /// The compiled template, or why it does not compile (reported on use, so a
    /// broken template never stops plain generation).
    chat_template: Option<Result<ChatTemplate, String>>,
    chat_template_source: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, LlmError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LlmError::Tokenizer { path: path.to_path_buf(), message: format!("not valid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LlmError::io(path, e)),
    }
}

/// A special token as configs write it: a string or `{"content": "…"}`.
fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads the tokenizer of a model folder.
    pub fn load(folder: &Path, config: &ModelConfig) -> Result<Self, LlmError> {
        let path = folder.join("tokenizer.json");
        if !path.exists() {
            return Err(LlmError::Tokenizer { path, message: "missing: swift needs a fast tokenizer (tokenizer.json)".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| LlmError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let config_path = folder.join("tokenizer_config.json");
        let tokenizer_config = read_json(&config_path)?.unwrap_or_default();
        let bos_token = token_text(tokenizer_config.get("bos_token"));
        let eos_token = token_text(tokenizer_config.get("eos_token"));
        let pad_token = token_text(tokenizer_config.get("pad_token"));

        let template_file = folder.join("chat_template.jinja");
        let (source, source_path) = if template_file.exists() {
            (Some(std::fs::read_to_string(&template_file).map_err(|e| LlmError::io(&template_file, e))?), template_file)
        } else {
            let source = match tokenizer_config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: use the default one.
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
            (source, config_path.clone())
        };
        let chat_template = source.as_ref().map(|source| {
            ChatTemplate::new(source, bos_token.as_deref().unwrap_or(""), eos_token.as_deref().unwrap_or(""))
                .map_err(|e| format!("{}: {e}", source_path.display()))
        });

        let generation = read_json(&folder.join("generation_config.json"))?;
        let from_generation = generation
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
            .and_then(|v| serde_json::from_value::<TokenIds>(v.clone()).ok())
            .map(|ids| ids.to_vec());
        let eos_ids = match from_generation {
            Some(ids) if !ids.is_empty() => ids,
            _ if !config.eos_token_ids.is_empty() => config.eos_token_ids.clone(),
            _ => eos_token.as_deref().and_then(|t| inner.token_to_id(t)).into_iter().collect(),
        };
        Ok(Self { inner, bos_token, eos_token, pad_token, eos_ids, chat_template, chat_template_source: source })
    }

    /// Token ids of plain text, with the special tokens the tokenizer's own
    /// post-processor adds (a BOS for Llama-style tokenizers), as transformers'
    /// `tokenizer(text)` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        self.encode_with(text, true)
    }

    /// Token ids of text rendered by a chat template, which already holds its
    /// special tokens: nothing is added, as in transformers' `apply_chat_template`.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        self.encode_with(text, false)
    }

    /// Like [`TextTokenizer::encode_rendered`], also returning each token's end
    /// as a byte offset into `text`.
    pub fn encode_rendered_with_ends(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>), LlmError> {
        let encoding = self.inner.encode(text, false).map_err(|e| LlmError::Template(format!("tokenizing: {e}")))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().iter().map(|&(_, end)| end).collect()))
    }

    fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>, LlmError> {
        let encoding = self.inner.encode(text, add_special).map_err(|e| LlmError::Template(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, LlmError> {
        self.inner.decode(ids, skip_special).map_err(|e| LlmError::Template(format!("decoding: {e}")))
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS token text, if configured.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token text, if configured.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The padding token text, if configured.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// The model's chat template: `Ok(None)` if it has none, an error if its
    /// template does not compile.
    pub fn chat_template(&self) -> Result<Option<&ChatTemplate>, LlmError> {
        match &self.chat_template {
            None => Ok(None),
            Some(Ok(template)) => Ok(Some(template)),
            Some(Err(message)) => Err(LlmError::Template(message.clone())),
        }
    }

    /// The chat template's source text (it enters the keys of stages that use it).
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template_source.as_deref()
    }
}
