//! The two benchmark suites and their subject tables. The tables are data
//! (`stages/data/mmlu_subjects.json`, `ceval_subjects.json`, each naming its
//! source), not code: subject handles, display names (C-Eval's Chinese names)
//! and the category each subject counts towards.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// A benchmark suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Suite {
    /// MMLU (hendrycks/test, `cais/mmlu`): scored on `test`, shots from `dev`.
    Mmlu,
    /// C-Eval (hkust-nlp/ceval, `ceval/ceval-exam`): scored on `val`, shots from `dev`.
    Ceval,
}

/// Category of a subject missing from the suite's table (a local subject).
pub const UNLISTED: &str = "Unlisted";

impl Suite {
    /// Every suite, in report order.
    pub const ALL: [Suite; 2] = [Suite::Mmlu, Suite::Ceval];

    /// The name manifests and reports use (`mmlu`, `ceval`).
    pub fn name(self) -> &'static str {
        match self {
            Suite::Mmlu => "mmlu",
            Suite::Ceval => "ceval",
        }
    }

    /// The name people know it by.
    pub fn label(self) -> &'static str {
        match self {
            Suite::Mmlu => "MMLU",
            Suite::Ceval => "C-Eval",
        }
    }

    /// The suite called `name`.
    pub fn from_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The split whose questions are scored (CSV and Parquet files alike).
    pub fn scored_split(self) -> &'static str {
        match self {
            Suite::Mmlu => "test",
            Suite::Ceval => "val",
        }
    }

    /// The subject table.
    pub fn table(self) -> &'static SubjectTable {
        static MMLU: OnceLock<SubjectTable> = OnceLock::new();
        static CEVAL: OnceLock<SubjectTable> = OnceLock::new();
        let cell = match self {
            Suite::Mmlu => &MMLU,
            Suite::Ceval => &CEVAL,
        };
        cell.get_or_init(|| serde_json::from_str(self.table_json()).expect("the bundled subject table is valid JSON"))
    }

    /// The BLAKE3 digest (hex) of the bundled subject table, for keys: the
    /// names it gives enter prompts, its categories the report.
    pub fn table_digest(self) -> String {
        blake3::hash(self.table_json().as_bytes()).to_hex().to_string()
    }

    fn table_json(self) -> &'static str {
        match self {
            Suite::Mmlu => include_str!("../../data/mmlu_subjects.json"),
            Suite::Ceval => include_str!("../../data/ceval_subjects.json"),
        }
    }
}

/// One subject's entry.
#[derive(Clone, Debug, Deserialize)]
pub struct SubjectInfo {
    /// Display name: MMLU's handle with spaces, C-Eval's Chinese name.
    pub name: String,
    /// The category the subject counts towards.
    pub category: String,
}

/// A suite's subjects and categories.
#[derive(Clone, Debug, Deserialize)]
pub struct SubjectTable {
    /// Categories in report order.
    pub categories: Vec<String>,
    /// Subjects by handle.
    pub subjects: BTreeMap<String, SubjectInfo>,
}

impl SubjectTable {
    /// The category of `handle`, or [`UNLISTED`].
    pub fn category(&self, handle: &str) -> &str {
        self.subjects.get(handle).map_or(UNLISTED, |s| s.category.as_str())
    }

    /// The display name of `handle`, if the table lists it.
    pub fn name(&self, handle: &str) -> Option<&str> {
        self.subjects.get(handle).map(|s| s.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_hold_every_subject_with_a_known_category() {
        for (suite, count) in [(Suite::Mmlu, 57), (Suite::Ceval, 52)] {
            let table = suite.table();
            assert_eq!(table.subjects.len(), count, "{}", suite.name());
            for (handle, info) in &table.subjects {
                assert!(table.categories.contains(&info.category), "{handle}: {}", info.category);
            }
        }
        assert_eq!(Suite::Ceval.table().name("computer_network"), Some("计算机网络"));
        assert_eq!(Suite::Mmlu.table().category("abstract_algebra"), "STEM");
        assert_eq!(Suite::Ceval.table().category("local_law"), UNLISTED);
    }
}
