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
//!
//! Tokenizing is bounded by the row, not the input: a caller says how many
//! tokens it can use (`limit`), and only a prefix of the text is tokenized,
//! grown fourfold until it yields [`MARGIN`] tokens more than the limit (a
//! single 50 MB line would otherwise take gigabytes of offsets). Cutting the
//! text can change only its last few tokens, so the first `limit` tokens are
//! those of the whole text; prefixes that reach past the tokenized part count
//! as the whole tokenized part.

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
    /// tokenization when the prefix lines up with it. `covered` is how much of
    /// `full` was tokenized; a prefix reaching past it has at least every
    /// token of `ends`.
    fn prefix_tokens(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        full: &str,
        ends: &[usize],
        covered: usize,
    ) -> Result<usize, String> {
        let prefix = self.render(messages, add_generation_prompt)?;
        if covered < full.len() && prefix.len() >= covered {
            return Ok(ends.len());
        }
        if full.starts_with(&prefix) {
            let count = ends.partition_point(|&end| end <= prefix.len());
            if count > 0 && ends[count - 1] == prefix.len() && ends.get(count).is_none_or(|&next| next > prefix.len()) {
                return Ok(count);
            }
        }
        Ok(self.tokenizer.encode_rendered(&prefix).map_err(|e| e.to_string())?.len())
    }

    /// Tokenizes a conversation and marks its assistant turns: every token,
    /// or the first `limit` when it has more.
    pub fn encode(&self, messages: &[Message], limit: usize) -> Result<Sample, String> {
        let full = self.render(messages, false)?;
        let (ids, ends, covered) = self.encode_prefix(&full, limit)?;
        let mut labels = vec![0u8; ids.len()];
        let assistant: Vec<usize> = messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
        let trained: &[usize] = match self.train_on {
            TrainOn::AllAssistant => &assistant,
            TrainOn::LastAssistant => assistant.last().map(std::slice::from_ref).unwrap_or(&[]),
        };
        for &turn in trained {
            let start = if turn == 0 { 0 } else { self.prefix_tokens(&messages[..turn], true, &full, &ends, covered)? };
            let end = self.prefix_tokens(&messages[..=turn], false, &full, &ends, covered)?.min(ids.len());
            for label in labels.iter_mut().take(end).skip(start) {
                *label = 1;
            }
        }
        Ok(Sample { ids, labels })
    }

    /// The ids and token ends of `text`, at most `limit` of them, and how many
    /// bytes of `text` were tokenized.
    fn encode_prefix(&self, text: &str, limit: usize) -> Result<(Vec<u32>, Vec<usize>, usize), String> {
        let mut budget = limit.saturating_add(MARGIN).saturating_mul(BYTES_PER_TOKEN);
        loop {
            let covered = if budget >= text.len() { text.len() } else { text.floor_char_boundary(budget) };
            let (mut ids, mut ends) = self.tokenizer.encode_rendered_with_ends(&text[..covered]).map_err(|e| e.to_string())?;
            if covered == text.len() || ids.len() >= limit.saturating_add(MARGIN) {
                ids.truncate(limit);
                ends.truncate(limit);
                return Ok((ids, ends, covered));
            }
            budget = budget.saturating_mul(4);
        }
    }
}

/// Tokens past the limit a text prefix must yield before its first `limit`
/// tokens are taken as the whole text's (cutting a text changes only the
/// tokens of its last word or two).
const MARGIN: usize = 64;

/// Bytes of text first tokenized per token wanted: a little above what BPE
/// vocabularies average on English (about 4), so one pass usually suffices.
const BYTES_PER_TOKEN: usize = 6;

/// ChatML, the built-in template for models without one (`fallback_template = "chatml"`).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ModelConfig;

    fn tokenizer() -> TextTokenizer {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2-tiny");
        TextTokenizer::load(&folder, &ModelConfig::load(&folder).unwrap()).unwrap()
    }

    fn conversation(user: &str, assistant: &str) -> Vec<Message> {
        vec![
            Message { role: "user".into(), content: user.into() },
            Message { role: "assistant".into(), content: assistant.into() },
        ]
    }

    #[test]
    fn a_limit_keeps_the_first_tokens_and_labels_of_the_whole_text() {
        let tok = tokenizer();
        let template = tok.chat_template().unwrap().unwrap();
        let encoder = Encoder::new(&tok, template, TrainOn::AllAssistant);
        let words: String = (0..3000).map(|i| format!("clause {i} of the statute, ")).collect();
        for messages in [conversation("Summarise.", &words), conversation(&words, "It is void."), conversation("Hi", "Hello")] {
            let whole = encoder.encode(&messages, usize::MAX).unwrap();
            for limit in [1, 7, 100, 512, whole.ids.len(), whole.ids.len() + 5] {
                let cut = encoder.encode(&messages, limit).unwrap();
                let kept = limit.min(whole.ids.len());
                assert_eq!(cut.ids, whole.ids[..kept], "limit {limit}");
                assert_eq!(cut.labels, whole.labels[..kept], "limit {limit}");
            }
        }
    }

    #[test]
    fn a_huge_text_is_tokenized_only_as_far_as_the_limit() {
        let tok = tokenizer();
        let template = tok.chat_template().unwrap().unwrap();
        let encoder = Encoder::new(&tok, template, TrainOn::AllAssistant);
        let huge = "objection sustained ".repeat(2_000_000);
        let (ids, ends, covered) = encoder.encode_prefix(&huge, 100).unwrap();
        assert_eq!(ids.len(), 100);
        assert_eq!(ends.len(), 100);
        assert!(covered < 10_000, "tokenized {covered} bytes for 100 tokens");
    }
}
