//! Reading dataset files into rows: JSONL, JSON (an array of objects) and CSV
//! (a header row), or a folder of them. Every row remembers its file and line
//! so errors can name them.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// One row of a dataset file.
#[derive(Clone, Debug)]
pub struct Row {
    /// The file it came from.
    pub file: PathBuf,
    /// 1-based line (JSONL, CSV) or element index + 1 (JSON arrays).
    pub line: usize,
    /// The row's fields.
    pub fields: Map<String, Value>,
}

/// A row that could not be read or understood.
#[derive(Clone, Debug, PartialEq)]
pub struct RowError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 for the whole file).
    pub line: usize,
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// Why, as a short reason that also serves as the skip-count category.
    pub reason: String,
    /// Details for the message.
    pub detail: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.reason)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// Files of a dataset input: the file itself, or the data files in a folder
/// (recursively, sorted by path).
pub fn data_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("jsonl" | "json" | "csv")) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Reads one file's rows. Whole-file problems (unreadable, not UTF-8, not the
/// format its extension says) are an `Err`; bad rows come back in the list
/// beside the good ones.
pub fn read_file(path: &Path) -> Result<(Vec<Row>, Vec<RowError>), RowError> {
    let whole = |reason: &str, detail: String| RowError { file: path.to_path_buf(), line: 0, field: None, reason: reason.to_string(), detail };
    let bytes = std::fs::read(path).map_err(|e| whole("unreadable file", e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        RowError { file: path.to_path_buf(), line, field: None, reason: "not UTF-8".into(), detail: "save the file as UTF-8".into() }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => Ok(read_jsonl(path, text)),
        Some("json") => read_json(path, text),
        Some("csv") => read_csv(path, text),
        _ => Err(whole("unsupported file type", "use .jsonl, .json or .csv".into())),
    }
}

fn read_jsonl(path: &Path, text: &str) -> (Vec<Row>, Vec<RowError>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |reason: &str, detail: String| RowError { file: path.to_path_buf(), line: i + 1, field: None, reason: reason.into(), detail };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => rows.push(Row { file: path.to_path_buf(), line: i + 1, fields }),
            Ok(_) => errors.push(error("not a JSON object", "each line holds one object".into())),
            Err(e) => errors.push(error("malformed JSON", e.to_string())),
        }
    }
    (rows, errors)
}

fn read_json(path: &Path, text: &str) -> Result<(Vec<Row>, Vec<RowError>), RowError> {
    let value: Value = serde_json::from_str(text).map_err(|e| RowError {
        file: path.to_path_buf(),
        line: e.line(),
        field: None,
        reason: "malformed JSON".into(),
        detail: format!("{e}; a .json file holds one array of objects (use .jsonl for one object per line)"),
    })?;
    let Value::Array(items) = value else {
        return Err(RowError {
            file: path.to_path_buf(),
            line: 0,
            field: None,
            reason: "not a JSON array".into(),
            detail: "a .json dataset is an array of objects".into(),
        });
    };
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Value::Object(fields) => rows.push(Row { file: path.to_path_buf(), line: i + 1, fields }),
            _ => errors.push(RowError {
                file: path.to_path_buf(),
                line: i + 1,
                field: None,
                reason: "not a JSON object".into(),
                detail: format!("array element {i}"),
            }),
        }
    }
    Ok((rows, errors))
}

fn read_csv(path: &Path, text: &str) -> Result<(Vec<Row>, Vec<RowError>), RowError> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| RowError { file: path.to_path_buf(), line: 1, field: None, reason: "malformed CSV".into(), detail: e.to_string() })?
        .clone();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for record in reader.records() {
        match record {
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                let mut fields = Map::new();
                for (name, value) in headers.iter().zip(record.iter()) {
                    // A cell holding JSON (a list of messages) is read as JSON.
                    let parsed = match value.trim_start().chars().next() {
                        Some('[') | Some('{') => serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string())),
                        _ => Value::String(value.to_string()),
                    };
                    fields.insert(name.to_string(), parsed);
                }
                rows.push(Row { file: path.to_path_buf(), line, fields });
            }
            Err(e) => errors.push(RowError {
                file: path.to_path_buf(),
                line: e.position().map_or(0, |p| p.line() as usize),
                field: None,
                reason: "malformed CSV".into(),
                detail: e.to_string(),
            }),
        }
    }
    Ok((rows, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn jsonl_json_and_csv_rows_keep_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = write(dir.path(), "a.jsonl", b"{\"q\": 1}\n\n{bad\n[1]\n{\"q\": 2}\n");
        let (rows, errors) = read_file(&jsonl).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(errors.iter().map(|e| (e.line, e.reason.as_str())).collect::<Vec<_>>(), vec![(3, "malformed JSON"), (4, "not a JSON object")]);
        let json = write(dir.path(), "b.json", b"[{\"q\": 1}, 2]");
        let (rows, errors) = read_file(&json).unwrap();
        assert_eq!((rows.len(), errors.len()), (1, 1));
        let csv = write(dir.path(), "c.csv", b"instruction,output\nSay hi,\"hi, there\"\n");
        let (rows, _) = read_file(&csv).unwrap();
        assert_eq!(rows[0].fields["output"], "hi, there");
        assert_eq!(rows[0].line, 2);
    }

    #[test]
    fn whole_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(dir.path(), "x.jsonl", b"{\"q\": 1}\n\xff\xfe\n");
        let e = read_file(&bad).unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (2, "not UTF-8"));
        let lying = write(dir.path(), "y.json", b"{\"q\": 1}\n{\"q\": 2}\n");
        let e = read_file(&lying).unwrap_err();
        assert!(e.to_string().contains("use .jsonl"), "{e}");
    }
}
