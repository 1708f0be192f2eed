//! Reading a suite's questions from the layouts it ships in:
//!
//! - MMLU's original CSV files, `data/{dev,test}/{subject}_{split}.csv` (the
//!   `data/` level optional), no header: question, A, B, C, D, answer;
//! - C-Eval's CSV files, `{dev,val}/{subject}_{split}.csv`, with the header
//!   `id,question,A,B,C,D,answer,explanation` (columns found by name);
//! - the Hub's Parquet layouts, `{subject}/{split}-NNNNN-of-NNNNN.parquet`:
//!   `cais/mmlu` (question, subject, choices: list, answer: 0–3) and
//!   `ceval/ceval-exam` (id, question, A, B, C, D, answer, explanation). The
//!   Hub's `all/` folder of `cais/mmlu` repeats every subject and is skipped.
//!
//! A question's `row` is its 0-based data row in the split's file(s), header
//! excluded: the `index` of `predictions.jsonl`.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use swift_cache::store::read_dir_sorted;

use super::suites::Suite;

/// Letters of the four options.
pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// 0-based data row in its split.
    pub row: usize,
    /// The question text, as stored.
    pub question: String,
    /// Options A–D.
    pub choices: [String; 4],
    /// The correct option, 0–3.
    pub answer: usize,
}

/// One subject's shots and scored questions.
#[derive(Clone, Debug)]
pub struct Subject {
    /// The handle, as the file names give it (`abstract_algebra`).
    pub handle: String,
    /// The `dev` rows, in order: the shots.
    pub dev: Vec<Question>,
    /// The scored split's rows.
    pub scored: Vec<Question>,
}

/// How a suite's folder is laid out.
#[derive(Clone, Debug, PartialEq)]
enum Layout {
    /// `{root}/{split}/{subject}_{split}.csv`.
    Csv(PathBuf),
    /// `{root}/{subject}/{split}-*.parquet`.
    Parquet(PathBuf),
}

/// Reads every subject of `suite` under `root` (or only `wanted`), sorted by
/// handle, each with at most `limit` scored questions.
pub fn load(root: &Path, suite: Suite, wanted: &[String], limit: Option<usize>) -> anyhow::Result<Vec<Subject>> {
    let layout = detect(root, suite)?;
    let available = handles(&layout, "dev")?;
    if available.is_empty() {
        bail!("{} holds no {} subjects ({})", root.display(), suite.label(), expected(suite));
    }
    if let Some(orphan) = handles(&layout, suite.scored_split())?.into_iter().find(|h| !available.contains(h)) {
        bail!("{}: subject `{orphan}` has {} questions but no dev file: every subject needs both", root.display(), suite.scored_split());
    }
    let mut chosen: Vec<String> = if wanted.is_empty() {
        available
    } else {
        for handle in wanted {
            if !available.contains(handle) {
                bail!(
                    "subject `{handle}` is not in {} (it has {}{})",
                    root.display(),
                    available.iter().take(8).cloned().collect::<Vec<_>>().join(", "),
                    if available.len() > 8 { ", …" } else { "" }
                );
            }
        }
        wanted.to_vec()
    };
    chosen.sort();
    chosen
        .into_iter()
        .map(|handle| {
            let dev = read_split(&layout, suite, &handle, "dev")?;
            let mut scored = read_split(&layout, suite, &handle, suite.scored_split())?;
            if scored.is_empty() {
                bail!("{}: subject `{handle}` has no {} questions", root.display(), suite.scored_split());
            }
            if let Some(limit) = limit {
                scored.truncate(limit);
            }
            Ok(Subject { handle, dev, scored })
        })
        .collect()
}

fn expected(suite: Suite) -> String {
    match suite {
        Suite::Mmlu => "expected MMLU's data/{dev,test}/{subject}_{split}.csv or cais/mmlu's {subject}/{split}-*.parquet".into(),
        Suite::Ceval => "expected C-Eval's {dev,val}/{subject}_{split}.csv or ceval/ceval-exam's {subject}/{split}-*.parquet".into(),
    }
}

fn detect(root: &Path, suite: Suite) -> anyhow::Result<Layout> {
    for base in [root.join("data"), root.to_path_buf()] {
        if base.join("dev").is_dir() {
            return Ok(Layout::Csv(base));
        }
    }
    let has_parquet = read_dir_sorted(root)?.iter().any(|dir| dir.is_dir() && parquet_files(dir, "dev").is_ok_and(|f| !f.is_empty()));
    if has_parquet {
        return Ok(Layout::Parquet(root.to_path_buf()));
    }
    bail!("{} is not a {} dataset: {}", root.display(), suite.label(), expected(suite))
}

/// Subject handles with a `split` file, sorted.
fn handles(layout: &Layout, split: &str) -> anyhow::Result<Vec<String>> {
    let mut handles = Vec::new();
    match layout {
        Layout::Csv(base) => {
            let dir = base.join(split);
            let suffix = format!("_{split}.csv");
            for path in read_dir_sorted(&dir)? {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if let Some(handle) = name.strip_suffix(&suffix) {
                    handles.push(handle.to_string());
                }
            }
        }
        Layout::Parquet(root) => {
            for dir in read_dir_sorted(root)? {
                let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                if dir.is_dir() && name != "all" && !name.starts_with('.') && !parquet_files(&dir, split)?.is_empty() {
                    handles.push(name);
                }
            }
        }
    }
    Ok(handles)
}

fn read_split(layout: &Layout, suite: Suite, handle: &str, split: &str) -> anyhow::Result<Vec<Question>> {
    match layout {
        Layout::Csv(base) => {
            let path = base.join(split).join(format!("{handle}_{split}.csv"));
            if !path.exists() {
                bail!("{} is missing: every subject needs a dev file and a {} file", path.display(), suite.scored_split());
            }
            match suite {
                Suite::Mmlu => read_mmlu_csv(&path),
                Suite::Ceval => read_ceval_csv(&path),
            }
        }
        Layout::Parquet(root) => {
            let files = parquet_files(&root.join(handle), split)?;
            if files.is_empty() {
                bail!("{} has no {split}-*.parquet file", root.join(handle).display());
            }
            let mut questions = Vec::new();
            for file in files {
                let start = questions.len();
                questions.extend(read_parquet(&file, start)?);
            }
            Ok(questions)
        }
    }
}

/// `{split}-*.parquet` files of a subject folder, sorted (shard order).
fn parquet_files(dir: &Path, split: &str) -> anyhow::Result<Vec<PathBuf>> {
    Ok(read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.strip_prefix(split).is_some_and(|rest| rest.starts_with('-')) && name.ends_with(".parquet")
        })
        .collect())
}

fn answer_index(value: &str, at: &dyn Fn() -> String) -> anyhow::Result<usize> {
    LETTERS
        .iter()
        .position(|l| *l == value.trim())
        .ok_or_else(|| anyhow!("{}: answer `{value}` is not one of A, B, C, D", at()))
}

fn csv_reader(path: &Path, headers: bool) -> anyhow::Result<csv::Reader<File>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(csv::ReaderBuilder::new().has_headers(headers).flexible(true).from_reader(file))
}

/// MMLU's header-less CSV: question, A, B, C, D, answer.
fn read_mmlu_csv(path: &Path) -> anyhow::Result<Vec<Question>> {
    let mut questions = Vec::new();
    for (row, record) in csv_reader(path, false)?.records().enumerate() {
        let record = record.with_context(|| format!("reading {}", path.display()))?;
        let line = record.position().map_or(0, |p| p.line());
        let at = || format!("{}:{line}", path.display());
        if record.len() != 6 {
            let hint = if row == 0 && record.iter().any(|f| f.trim() == "question") { " (this looks like a header row: is this C-Eval?)" } else { "" };
            bail!("{}: expected 6 columns (question, A, B, C, D, answer; no header), found {}{hint}", at(), record.len());
        }
        let choices = [1, 2, 3, 4].map(|i| record[i].to_string());
        let answer = answer_index(&record[5], &at).map_err(|e| {
            if row == 0 && record[5].trim() == "answer" { e.context("MMLU files have no header row: delete it") } else { e }
        })?;
        questions.push(Question { row, question: record[0].to_string(), choices, answer });
    }
    Ok(questions)
}

/// C-Eval's CSV with a header naming question, A, B, C, D and answer.
fn read_ceval_csv(path: &Path) -> anyhow::Result<Vec<Question>> {
    let mut reader = csv_reader(path, true)?;
    let header = reader.headers().with_context(|| format!("reading {}", path.display()))?.clone();
    let column = |name: &str| {
        header.iter().position(|h| h.trim() == name).ok_or_else(|| {
            anyhow!(
                "{}:1: the header has no `{name}` column (C-Eval's is id,question,A,B,C,D,answer,explanation; found {})",
                path.display(),
                header.iter().collect::<Vec<_>>().join(",")
            )
        })
    };
    let q = column("question")?;
    let options = [column("A")?, column("B")?, column("C")?, column("D")?];
    let a = column("answer")?;
    let mut questions = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("reading {}", path.display()))?;
        let line = record.position().map_or(0, |p| p.line());
        let at = || format!("{}:{line}", path.display());
        let field = |i: usize| record.get(i).map(str::to_string).ok_or_else(|| anyhow!("{}: the row has {} columns, the header {}", at(), record.len(), header.len()));
        let choices = [field(options[0])?, field(options[1])?, field(options[2])?, field(options[3])?];
        questions.push(Question { row, question: field(q)?, choices, answer: answer_index(&field(a)?, &at)? });
    }
    Ok(questions)
}

/// A Parquet file in either Hub schema; rows numbered from `start`.
fn read_parquet(path: &Path, start: usize) -> anyhow::Result<Vec<Question>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{} is not a Parquet file", path.display()))?;
    let mut questions = Vec::new();
    for (n, row) in reader.get_row_iter(None).with_context(|| format!("reading {}", path.display()))?.enumerate() {
        let row = row.with_context(|| format!("reading {}", path.display()))?;
        let at = || format!("{} row {}", path.display(), start + n);
        let get = |name: &str| row.get_column_iter().find(|(column, _)| column.as_str() == name).map(|(_, field)| field);
        let text = |name: &str| -> anyhow::Result<String> {
            match get(name) {
                Some(Field::Str(s)) => Ok(s.clone()),
                Some(Field::Null) => Ok(String::new()),
                Some(other) => bail!("{}: column `{name}` is not text ({other})", at()),
                None => bail!("{}: no `{name}` column (expected cais/mmlu's question/choices/answer or ceval-exam's question/A/B/C/D/answer)", at()),
            }
        };
        let (choices, answer) = match get("choices") {
            Some(Field::ListInternal(list)) => {
                let texts = list
                    .elements()
                    .iter()
                    .map(|f| match f {
                        Field::Str(s) => Ok(s.clone()),
                        other => Err(anyhow!("{}: a choice is not text ({other})", at())),
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let choices: [String; 4] =
                    texts.try_into().map_err(|t: Vec<String>| anyhow!("{}: {} choices, expected 4", at(), t.len()))?;
                let answer = match get("answer") {
                    Some(Field::Long(i)) => *i,
                    Some(Field::Int(i)) => i64::from(*i),
                    Some(Field::Str(s)) => answer_index(s, &at)? as i64,
                    _ => bail!("{}: `answer` must be the correct choice's index 0–3", at()),
                };
                let answer = usize::try_from(answer).ok().filter(|&a| a < 4).ok_or_else(|| anyhow!("{}: answer {answer} is not 0–3", at()))?;
                (choices, answer)
            }
            Some(other) => bail!("{}: `choices` is not a list ({other})", at()),
            None => ([text("A")?, text("B")?, text("C")?, text("D")?], answer_index(&text("answer")?, &at)?),
        };
        questions.push(Question { row: start + n, question: text("question")?, choices, answer });
    }
    Ok(questions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn mmlu_csv_rows_keep_quotes_commas_and_newlines() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "data/dev/algebra_dev.csv", "q1,a,b,c,d,A\n");
        write(dir.path(), "data/test/algebra_test.csv", "\"Is \"\"x, y\"\"\nfine?\",1,2,3,4,C\nplain,a,b,c,d, D\n");
        let subjects = load(dir.path(), Suite::Mmlu, &[], None).unwrap();
        assert_eq!(subjects.len(), 1);
        let s = &subjects[0];
        assert_eq!((s.handle.as_str(), s.dev.len()), ("algebra", 1));
        assert_eq!(s.scored[0].question, "Is \"x, y\"\nfine?");
        assert_eq!(s.scored[0].answer, 2);
        assert_eq!((s.scored[1].row, s.scored[1].answer), (1, 3));
        assert_eq!(load(dir.path(), Suite::Mmlu, &[], Some(1)).unwrap()[0].scored.len(), 1);
    }

    #[test]
    fn bad_rows_name_file_line_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "dev/x_dev.csv", "q,a,b,c,d,A\n");
        write(dir.path(), "test/x_test.csv", "q,a,b,c,d,A\nq2,a,b,c,d,E\n");
        let err = format!("{:#}", load(dir.path(), Suite::Mmlu, &[], None).unwrap_err());
        assert!(err.contains("x_test.csv:2") && err.contains("answer `E`"), "{err}");
        write(dir.path(), "test/x_test.csv", "q,a,b,c,A\n");
        let err = format!("{:#}", load(dir.path(), Suite::Mmlu, &[], None).unwrap_err());
        assert!(err.contains("x_test.csv:1") && err.contains("expected 6 columns"), "{err}");
        write(dir.path(), "test/x_test.csv", "");
        let err = format!("{:#}", load(dir.path(), Suite::Mmlu, &[], None).unwrap_err());
        assert!(err.contains("no test questions"), "{err}");
        let err = format!("{:#}", load(dir.path(), Suite::Mmlu, &["y".into()], None).unwrap_err());
        assert!(err.contains("subject `y` is not in") && err.contains("it has x"), "{err}");
        write(dir.path(), "test/x_test.csv", "q,a,b,c,d,A\n");
        write(dir.path(), "test/z_test.csv", "q,a,b,c,d,A\n");
        let err = format!("{:#}", load(dir.path(), Suite::Mmlu, &[], None).unwrap_err());
        assert!(err.contains("subject `z` has test questions but no dev file"), "{err}");
        write(dir.path(), "dev/z_dev.csv", "question,A,B,C,D,answer\n");
        let err = format!("{:#}", load(dir.path(), Suite::Mmlu, &[], None).unwrap_err());
        assert!(err.contains("z_dev.csv:1") && err.contains("no header row"), "{err}");
    }

    #[test]
    fn ceval_csv_finds_columns_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "dev/law_dev.csv", "id,question,A,B,C,D,answer,explanation\n0,问,甲,乙,丙,丁,B,因为\n");
        write(dir.path(), "val/law_val.csv", "id,question,A,B,C,D,answer,explanation\n0,问题,1,2,3,4,D,\n");
        let s = &load(dir.path(), Suite::Ceval, &[], None).unwrap()[0];
        assert_eq!(s.dev[0].choices[1], "乙");
        assert_eq!((s.scored[0].question.as_str(), s.scored[0].answer), ("问题", 3));
        write(dir.path(), "val/law_val.csv", "id,question,A,B,C,D\n0,问题,1,2,3,4\n");
        let err = format!("{:#}", load(dir.path(), Suite::Ceval, &[], None).unwrap_err());
        assert!(err.contains("law_val.csv:1") && err.contains("no `answer` column"), "{err}");
    }

    #[test]
    fn a_folder_of_neither_layout_says_what_it_expected() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "readme.txt", "hi");
        let err = format!("{:#}", load(dir.path(), Suite::Ceval, &[], None).unwrap_err());
        assert!(err.contains("not a C-Eval dataset") && err.contains("{dev,val}"), "{err}");
    }
}
