//! Row formats → conversations: `messages`, ShareGPT as axolotl writes it
//! (`conversations` of `from`/`value`) and as ms-swift writes it
//! (`conversation` of `human`/`assistant` pairs), Alpaca, and query/response.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::records::{Row, RowError};
use crate::llm::chat::Message;

/// How rows are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Detected from each file's first row.
    #[default]
    Auto,
    /// `{"messages": [{"role", "content"}, …]}`.
    Messages,
    /// `{"conversations": [{"from", "value"}, …]}`.
    Sharegpt,
    /// `{"conversation": [{"human", "assistant"}, …], "system"?}` (ms-swift).
    SwiftSharegpt,
    /// `{"instruction", "input"?, "output", "system"?}`.
    Alpaca,
    /// `{"query", "response", "system"?, "history"?: [[q, r], …]}`.
    QueryResponse,
}

impl Format {
    /// The format a row's keys show, if any.
    pub fn detect(row: &Row) -> Option<Format> {
        let has = |k: &str| row.fields.contains_key(k);
        if has("messages") {
            Some(Format::Messages)
        } else if has("conversations") {
            Some(Format::Sharegpt)
        } else if has("conversation") {
            Some(Format::SwiftSharegpt)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("query") && has("response") {
            Some(Format::QueryResponse)
        } else {
            None
        }
    }
}

/// Maps the role names datasets use to the chat roles templates know.
pub fn canonical_role(role: &str) -> Option<&'static str> {
    match role.to_ascii_lowercase().as_str() {
        "system" => Some("system"),
        "user" | "human" | "question" => Some("user"),
        "assistant" | "gpt" | "bot" | "model" | "answer" => Some("assistant"),
        "tool" | "function" | "observation" | "ipython" => Some("tool"),
        _ => None,
    }
}

fn error(row: &Row, field: &str, reason: &str, detail: impl Into<String>) -> RowError {
    RowError { file: row.file.clone(), line: row.line, field: Some(field.into()), reason: reason.into(), detail: detail.into() }
}

fn text<'a>(row: &'a Row, value: Option<&'a Value>, field: &str) -> Result<&'a str, RowError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(error(row, field, "not a string", "")),
        None => Err(error(row, field, "missing field", "")),
    }
}

/// The conversation a row holds, with `system` prepended when the row has no
/// system message of its own.
pub fn conversation(row: &Row, format: Format, system: Option<&str>) -> Result<Vec<Message>, RowError> {
    let format = match format {
        Format::Auto => Format::detect(row).ok_or_else(|| {
            error(row, "messages", "unknown row format", "expected messages, conversations, conversation, instruction/output or query/response")
        })?,
        f => f,
    };
    let message = |role: &str, content: &str| Message { role: role.to_string(), content: content.to_string() };
    let mut messages = Vec::new();
    match format {
        Format::Auto => unreachable!("resolved above"),
        Format::Messages | Format::Sharegpt => {
            let (field, role_key, content_key) =
                if format == Format::Messages { ("messages", "role", "content") } else { ("conversations", "from", "value") };
            let Some(Value::Array(items)) = row.fields.get(field) else {
                return Err(error(row, field, if row.fields.contains_key(field) { "not a list" } else { "missing field" }, ""));
            };
            for (i, item) in items.iter().enumerate() {
                let at = format!("{field}[{i}]");
                let role = text(row, item.get(role_key), &format!("{at}.{role_key}"))?;
                let canonical = canonical_role(role).ok_or_else(|| error(row, &format!("{at}.{role_key}"), "unknown role", role))?;
                let content = text(row, item.get(content_key), &format!("{at}.{content_key}"))?;
                messages.push(message(canonical, content));
            }
        }
        Format::SwiftSharegpt => {
            if let Some(Value::String(s)) = row.fields.get("system") {
                messages.push(message("system", s));
            }
            let Some(Value::Array(turns)) = row.fields.get("conversation") else {
                return Err(error(row, "conversation", "missing field", ""));
            };
            for (i, turn) in turns.iter().enumerate() {
                let at = format!("conversation[{i}]");
                messages.push(message("user", text(row, turn.get("human"), &format!("{at}.human"))?));
                messages.push(message("assistant", text(row, turn.get("assistant"), &format!("{at}.assistant"))?));
            }
        }
        Format::Alpaca => {
            if let Some(Value::String(s)) = row.fields.get("system") {
                messages.push(message("system", s));
            }
            let instruction = text(row, row.fields.get("instruction"), "instruction")?;
            let prompt = match row.fields.get("input") {
                Some(Value::String(input)) if !input.is_empty() => format!("{instruction}\n{input}"),
                _ => instruction.to_string(),
            };
            messages.push(message("user", &prompt));
            messages.push(message("assistant", text(row, row.fields.get("output"), "output")?));
        }
        Format::QueryResponse => {
            if let Some(Value::String(s)) = row.fields.get("system") {
                messages.push(message("system", s));
            }
            if let Some(history) = row.fields.get("history") {
                let Value::Array(pairs) = history else { return Err(error(row, "history", "not a list", "")) };
                for (i, pair) in pairs.iter().enumerate() {
                    let at = format!("history[{i}]");
                    match pair.as_array().map(Vec::as_slice) {
                        Some([Value::String(q), Value::String(r)]) => {
                            messages.push(message("user", q));
                            messages.push(message("assistant", r));
                        }
                        _ => return Err(error(row, &at, "not a [query, response] pair", "")),
                    }
                }
            }
            messages.push(message("user", text(row, row.fields.get("query"), "query")?));
            messages.push(message("assistant", text(row, row.fields.get("response"), "response")?));
        }
    }
    if messages.iter().all(|m| m.role == "system") {
        return Err(error(row, "messages", "empty conversation", "no user or assistant turn"));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(error(row, "messages", "no assistant turn", "nothing to train on"));
    }
    if let Some(system) = system {
        if messages.first().is_none_or(|m| m.role != "system") {
            messages.insert(0, message("system", system));
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> Row {
        let Value::Object(fields) = serde_json::from_str(json).unwrap() else { panic!() };
        Row { file: "d.jsonl".into(), line: 3, fields }
    }

    fn roles(messages: &[Message]) -> Vec<&str> {
        messages.iter().map(|m| m.role.as_str()).collect()
    }

    #[test]
    fn every_format_becomes_a_conversation() {
        let m = conversation(&row(r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#), Format::Auto, None).unwrap();
        assert_eq!(roles(&m), ["user", "assistant"]);
        let s = conversation(&row(r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#), Format::Auto, Some("default")).unwrap();
        assert_eq!(roles(&s), ["system", "user", "assistant"]);
        assert_eq!(s[0].content, "s", "the row's own system message wins");
        let w = conversation(&row(r#"{"system": "s", "conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]}"#), Format::Auto, None).unwrap();
        assert_eq!(roles(&w), ["system", "user", "assistant", "user", "assistant"]);
        let a = conversation(&row(r#"{"instruction": "Do", "input": "this", "output": "done"}"#), Format::Auto, Some("sys")).unwrap();
        assert_eq!((a[0].content.as_str(), a[1].content.as_str()), ("sys", "Do\nthis"));
        let q = conversation(&row(r#"{"query": "q2", "response": "r2", "history": [["q1", "r1"]]}"#), Format::Auto, None).unwrap();
        assert_eq!(q.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(), ["q1", "r1", "q2", "r2"]);
    }

    #[test]
    fn bad_rows_name_their_field() {
        let e = conversation(&row(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#), Format::Auto, None).unwrap_err();
        assert_eq!((e.field.as_deref(), e.reason.as_str()), (Some("messages[0].role"), "unknown role"));
        let e = conversation(&row(r#"{"messages": []}"#), Format::Auto, None).unwrap_err();
        assert_eq!(e.reason, "empty conversation");
        let e = conversation(&row(r#"{"instruction": "x"}"#), Format::Alpaca, None).unwrap_err();
        assert_eq!((e.field.as_deref(), e.reason.as_str()), (Some("output"), "missing field"));
        assert!(e.to_string().starts_with("d.jsonl:3: field `output`: missing field"), "{e}");
    }
}
