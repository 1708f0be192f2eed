//! The prompt templates: how a subject's header, its k shots and a question
//! become the text that is scored, and the four continuations scored after it.
//!
//! - `lm-eval` reproduces lm-evaluation-harness 0.4 (`mmlu/default`,
//!   `ceval`): the question stripped, `"\nA. …\nD. …\nAnswer:"` (`答案：`),
//!   shots ending `" {answer}\n\n"`, continuations `" A"` … `" D"`; MMLU's
//!   header names the subject with spaces, C-Eval's by its Chinese name.
//! - `official` reproduces the datasets' own code (hendrycks/test
//!   `evaluate.py`, hkust-nlp/ceval): MMLU with two spaces after "about"
//!   (`format_subject` adds one), C-Eval's header with `考试` and the handle as
//!   written, shots `"…答案：{answer}\n\n"`, continuations `"A"` … `"D"`.
//!
//! Every string of a template is serialized into the stage's parameters, so
//! the exact prompt enters the key and the report.

use serde::{Deserialize, Serialize};

use super::data::{Question, LETTERS};
use super::suites::Suite;

/// A template's name in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemplateName {
    /// lm-evaluation-harness's prompts (the default).
    #[serde(rename = "lm-eval")]
    LmEval,
    /// The datasets' own evaluation code.
    #[serde(rename = "official")]
    Official,
}

/// How a header names the subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubjectName {
    /// The handle with underscores as spaces (`abstract algebra`).
    Spaced,
    /// The handle with underscores as spaces after one more space (`  abstract algebra`).
    SpacedAfterSpace,
    /// The subject table's display name (C-Eval's Chinese name), else the handle.
    Display,
    /// The handle as the file names write it.
    Handle,
}

/// Every string a prompt is built from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Template {
    /// Header with `{subject}` where the subject's name goes.
    pub header: &'static str,
    /// How `{subject}` is written.
    pub subject: SubjectName,
    /// Whether the question is stripped of surrounding whitespace.
    pub strip_question: bool,
    /// Text after the options, before the answer (`"\nAnswer:"`).
    pub answer_cue: &'static str,
    /// Between the cue and a letter, in shots and continuations (`" "`).
    pub target_delimiter: &'static str,
    /// After each shot's answer (`"\n\n"`).
    pub fewshot_delimiter: &'static str,
}

impl Template {
    /// The template `name` for `suite`.
    pub fn of(name: TemplateName, suite: Suite) -> Template {
        let mmlu = "The following are multiple choice questions (with answers) about {subject}.\n\n";
        match (name, suite) {
            (TemplateName::LmEval, Suite::Mmlu) => Template {
                header: mmlu,
                subject: SubjectName::Spaced,
                strip_question: true,
                answer_cue: "\nAnswer:",
                target_delimiter: " ",
                fewshot_delimiter: "\n\n",
            },
            (TemplateName::Official, Suite::Mmlu) => Template {
                header: mmlu,
                subject: SubjectName::SpacedAfterSpace,
                strip_question: false,
                answer_cue: "\nAnswer:",
                target_delimiter: " ",
                fewshot_delimiter: "\n\n",
            },
            (TemplateName::LmEval, Suite::Ceval) => Template {
                header: "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n",
                subject: SubjectName::Display,
                strip_question: true,
                answer_cue: "\n答案：",
                target_delimiter: " ",
                fewshot_delimiter: "\n\n",
            },
            (TemplateName::Official, Suite::Ceval) => Template {
                header: "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                subject: SubjectName::Handle,
                strip_question: false,
                answer_cue: "\n答案：",
                target_delimiter: "",
                fewshot_delimiter: "\n\n",
            },
        }
    }

    /// The header for subject `handle` of `suite`.
    pub fn header(&self, suite: Suite, handle: &str) -> String {
        let name = match self.subject {
            SubjectName::Spaced => handle.replace('_', " "),
            SubjectName::SpacedAfterSpace => format!(" {}", handle.replace('_', " ")),
            SubjectName::Display => suite.table().name(handle).unwrap_or(handle).to_string(),
            SubjectName::Handle => handle.to_string(),
        };
        self.header.replace("{subject}", &name)
    }

    /// A question with its options, up to the answer cue.
    pub fn example(&self, q: &Question) -> String {
        let mut text = if self.strip_question { q.question.trim().to_string() } else { q.question.clone() };
        for (letter, choice) in LETTERS.iter().zip(&q.choices) {
            text.push_str(&format!("\n{letter}. {choice}"));
        }
        text.push_str(self.answer_cue);
        text
    }

    /// A solved example: the question, its answer, the shot delimiter.
    pub fn shot(&self, q: &Question) -> String {
        format!("{}{}{}{}", self.example(q), self.target_delimiter, LETTERS[q.answer], self.fewshot_delimiter)
    }

    /// The four scored continuations, A–D. After a chat prompt the letters
    /// follow the generation prompt with no delimiter, as lm-eval scores them.
    pub fn continuations(&self, chat: bool) -> [String; 4] {
        let delimiter = if chat { "" } else { self.target_delimiter };
        LETTERS.map(|l| format!("{delimiter}{l}"))
    }

    /// The shots (the first `shots` dev rows) and the question: the scored
    /// text after the header.
    pub fn body(&self, dev: &[Question], shots: usize, q: &Question) -> String {
        let mut text = String::new();
        for shot in &dev[..shots.min(dev.len())] {
            text.push_str(&self.shot(shot));
        }
        text.push_str(&self.example(q));
        text
    }

    /// The scored text with the first `shots` dev rows.
    pub fn context(&self, suite: Suite, handle: &str, dev: &[Question], shots: usize, q: &Question) -> String {
        self.header(suite, handle) + &self.body(dev, shots, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(text: &str, answer: usize) -> Question {
        Question { row: 0, question: text.into(), choices: ["1".into(), "2".into(), "3".into(), "4".into()], answer }
    }

    #[test]
    fn lm_eval_mmlu_prompt_is_lm_evals_string() {
        let t = Template::of(TemplateName::LmEval, Suite::Mmlu);
        let dev = [question("What is 1+1?", 1)];
        let text = t.context(Suite::Mmlu, "abstract_algebra", &dev, 5, &question("  Find x. ", 0));
        assert_eq!(
            text,
            "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
             What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n\
             Find x.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
        );
        assert_eq!(t.continuations(false), [" A", " B", " C", " D"]);
        assert_eq!(t.continuations(true), ["A", "B", "C", "D"]);
    }

    #[test]
    fn official_templates_follow_the_datasets_code() {
        let mmlu = Template::of(TemplateName::Official, Suite::Mmlu);
        assert!(mmlu.header(Suite::Mmlu, "world_religions").ends_with("about  world religions.\n\n"));
        assert_eq!(mmlu.example(&question(" q ", 0)), " q \nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:");
        let ceval = Template::of(TemplateName::Official, Suite::Ceval);
        assert_eq!(ceval.header(Suite::Ceval, "computer_network"), "以下是中国关于computer_network考试的单项选择题，请选出其中的正确答案。\n\n");
        assert!(ceval.shot(&question("问", 2)).ends_with("\n答案：C\n\n"));
        assert_eq!(ceval.continuations(false), ["A", "B", "C", "D"]);
        let lm_eval = Template::of(TemplateName::LmEval, Suite::Ceval);
        assert_eq!(lm_eval.header(Suite::Ceval, "computer_network"), "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n");
        assert_eq!(lm_eval.header(Suite::Ceval, "local_law"), "以下是中国关于local_law的单项选择题，请选出其中的正确答案。\n\n");
    }
}
