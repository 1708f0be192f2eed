//! Byte offsets to line and column, and the spans of every key and value.

use std::collections::HashMap;
use std::ops::Range;

/// A parsed file's text, for turning byte offsets into line:column.
#[derive(Clone, Debug)]
pub struct SourceText {
    text: String,
    line_starts: Vec<usize>,
}

impl SourceText {
    /// Indexes `text`.
    pub fn new(text: String) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { text, line_starts }
    }

    /// The 1-based line and column (in characters) of a byte offset.
    pub fn location(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        let column = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count()) + 1;
        (line + 1, column)
    }
}

/// Where a key and its value sit in the file.
#[derive(Clone, Debug, Default)]
pub struct ItemSpan {
    /// The key's span.
    pub key: Option<Range<usize>>,
    /// The value's span (a table's header for `[table]`).
    pub value: Option<Range<usize>>,
}

/// Spans of every key path in a document (`["stages", "coarse", "lora", "rank"]`).
#[derive(Clone, Debug, Default)]
pub struct SpanIndex {
    spans: HashMap<Vec<String>, ItemSpan>,
}

impl SpanIndex {
    /// Records the spans of every item under a parsed document.
    pub fn of(doc: &toml_edit::Document<String>) -> Self {
        let mut index = Self::default();
        index.walk_table(&mut Vec::new(), doc.as_table());
        index
    }

    fn walk_table(&mut self, path: &mut Vec<String>, table: &toml_edit::Table) {
        for (name, item) in table.iter() {
            path.push(name.to_string());
            let key = table.key(name).and_then(|k| k.span());
            self.record(path, key, item);
            path.pop();
        }
    }

    fn record(&mut self, path: &mut Vec<String>, key: Option<Range<usize>>, item: &toml_edit::Item) {
        self.spans.insert(path.clone(), ItemSpan { key: key.clone(), value: item.span().or(key) });
        match item {
            toml_edit::Item::Table(table) => self.walk_table(path, table),
            toml_edit::Item::Value(value) => self.walk_value(path, value),
            toml_edit::Item::ArrayOfTables(tables) => {
                for (i, table) in tables.iter().enumerate() {
                    path.push(i.to_string());
                    self.spans.insert(path.clone(), ItemSpan { key: None, value: table.span() });
                    self.walk_table(path, table);
                    path.pop();
                }
            }
            toml_edit::Item::None => {}
        }
    }

    fn walk_value(&mut self, path: &mut Vec<String>, value: &toml_edit::Value) {
        match value {
            toml_edit::Value::InlineTable(table) => {
                for (name, item) in table.iter() {
                    path.push(name.to_string());
                    let key = table.key(name).and_then(|k| k.span());
                    self.spans.insert(path.clone(), ItemSpan { key: key.clone(), value: item.span().or(key) });
                    self.walk_value(path, item);
                    path.pop();
                }
            }
            toml_edit::Value::Array(array) => {
                for (i, item) in array.iter().enumerate() {
                    path.push(i.to_string());
                    self.spans.insert(path.clone(), ItemSpan { key: None, value: item.span() });
                    self.walk_value(path, item);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The best span for an error at `path`: the key for unknown keys, else the
    /// value, else the nearest enclosing item that has one.
    pub fn find(&self, path: &[String], prefer_key: bool) -> Option<Range<usize>> {
        (0..=path.len()).rev().find_map(|len| {
            let span = self.spans.get(&path[..len])?;
            if prefer_key && len == path.len() {
                span.key.clone().or(span.value.clone())
            } else {
                span.value.clone().or(span.key.clone())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based_in_characters() {
        let src = SourceText::new("a = 1\nbé = 2\n".to_string());
        assert_eq!(src.location(0), (1, 1));
        assert_eq!(src.location(6), (2, 1));
        assert_eq!(src.location(10), (2, 4));
    }

    #[test]
    fn spans_cover_nested_keys() {
        let text = "[stages.a]\nlora = { rank = 8 }\nlist = [1, 2]\n";
        let doc = toml_edit::Document::parse(text.to_string()).unwrap();
        let index = SpanIndex::of(&doc);
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rank = index.find(&path(&["stages", "a", "lora", "rank"]), true).unwrap();
        assert_eq!(&text[rank], "rank");
        let second = index.find(&path(&["stages", "a", "list", "1"]), false).unwrap();
        assert_eq!(&text[second], "2");
        let missing = index.find(&path(&["stages", "a", "nope"]), true).unwrap();
        assert!(text[missing].starts_with("[stages.a]"));
    }
}
