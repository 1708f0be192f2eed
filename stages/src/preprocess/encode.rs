//! Conversation → token ids and a label mask, with the model's chat template.
//!
//! The whole conversation is rendered and tokenized once. Each assistant turn's
//! tokens are found by rendering the conversation up to that turn with the
//! generation prompt (where the turn starts) and through that turn (where it
//! ends), and taking the difference in token counts — what transformers'
//! `apply_chat_template` gives for each prefix, and the same for any template,
//! with or without generation markers. When a prefix's text starts the full
//! text and ends exactly where one of the full text's tokens ends (the usual
//! case: turns meet at special tokens or whitespace), its token count is read
//! off the full tokenization instead of tokenizing the prefix again.

use serde::{Deserialize, Serialize};

use crate::llm::chat::{ChatTemplate, Message};
use crate::llm::TextTokenizer;

/// Which assistant turns are trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TrainOn {
    /// Every assistant turn (default).
    #[default]
    AllAssistant,
    /// Only the last assistant turn.
    LastAssistant,
}

/// One tokenized conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is trained on (an assistant turn), else 0.
    pub labels: Vec<u8>,
}

/// Renders and tokenizes conversations.
pub struct Encoder<'a> {
    tokenizer: &'a TextTokenizer,
    template: &'a ChatTemplate,
    train_on: TrainOn,
}

impl<'a> Encoder<'a> {
    /// An encoder with a tokenizer and the template to render with.
    pub fn new(tokenizer: &'a TextTokenizer, template: &'a ChatTemplate, train_on: TrainOn) -> Self {
        Self { tokenizer, template, train_on }
    }

    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        self.template.render(&messages, None::<&()>, add_generation_prompt).map_err(|e| e.to_string())
    }

    /// How many tokens the rendering of `messages` has, using the full text's
    /// tokenization when the prefix lines up with it.
    fn prefix_tokens(&self, messages: &[Message], add_generation_prompt: bool, full: &str, ends: &[usize]) -> Result<usize, String> {
        let prefix = self.render(messages, add_generation_prompt)?;
        if full.starts_with(&prefix) {
            let count = ends.partition_point(|&end| end <= prefix.len());
            if count > 0 && ends[count - 1] == prefix.len() && ends.get(count).is_none_or(|&next| next > prefix.len()) {
                return Ok(count);
            }
        }
        Ok(self.tokenizer.encode_rendered(&prefix).map_err(|e| e.to_string())?.len())
    }

    /// Tokenizes a conversation and marks its assistant turns.
    pub fn encode(&self, messages: &[Message]) -> Result<Sample, String> {
        let full = self.render(messages, false)?;
        let (ids, ends) = self.tokenizer.encode_rendered_with_ends(&full).map_err(|e| e.to_string())?;
        let mut labels = vec![0u8; ids.len()];
        let assistant: Vec<usize> = messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
        let trained: &[usize] = match self.train_on {
            TrainOn::AllAssistant => &assistant,
            TrainOn::LastAssistant => assistant.last().map(std::slice::from_ref).unwrap_or(&[]),
        };
        for &turn in trained {
            let start = if turn == 0 { 0 } else { self.prefix_tokens(&messages[..turn], true, &full, &ends)? };
            let end = self.prefix_tokens(&messages[..=turn], false, &full, &ends)?.min(ids.len());
            for label in labels.iter_mut().take(end).skip(start) {
                *label = 1;
            }
        }
        Ok(Sample { ids, labels })
    }
}

/// ChatML, the built-in template for models without one (`fallback_template = "chatml"`).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
