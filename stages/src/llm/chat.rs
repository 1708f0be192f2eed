//! Chat templates, rendered as transformers' `apply_chat_template` renders
//! them: Jinja with `trim_blocks` and `lstrip_blocks`, Python string methods,
//! `raise_exception`, `strftime_now`, and a `tojson` that writes exactly what
//! Python's `json.dumps(..., ensure_ascii=False)` writes.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use super::LlmError;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles template source; `bos_token` and `eos_token` are what the
    /// template sees under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, LlmError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string()).map_err(|e| LlmError::Template(describe(&e)))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders a conversation. `messages` and `tools` are any serializable
    /// values (tool calls and tool definitions pass through as the template
    /// expects them).
    pub fn render<M: Serialize, T: Serialize>(
        &self,
        messages: &M,
        tools: Option<&T>,
        add_generation_prompt: bool,
    ) -> Result<String, LlmError> {
        let template = self.env.get_template("chat").map_err(|e| LlmError::Template(describe(&e)))?;
        let mut context = serde_json::Map::new();
        context.insert("messages".into(), serde_json::to_value(messages).map_err(|e| LlmError::Template(e.to_string()))?);
        // transformers passes tools=None and documents=None when there are none:
        // templates test `tools is not none`.
        let tools = match tools {
            Some(tools) => serde_json::to_value(tools).map_err(|e| LlmError::Template(e.to_string()))?,
            None => serde_json::Value::Null,
        };
        context.insert("tools".into(), tools);
        context.insert("documents".into(), serde_json::Value::Null);
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        template.render(Value::from_serialize(&context)).map_err(|e| LlmError::Template(describe(&e)))
    }
}

fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    text
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps` as transformers' `tojson` calls it: `ensure_ascii`
/// (default false), `indent`, `separators` and `sort_keys` keyword arguments.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators is a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys == Some(true) {
        sort_json(&mut json);
    }
    let style = JsonStyle { indent, item, key, ensure_ascii: ensure_ascii.unwrap_or(false) };
    let mut out = String::new();
    write_python_json(&json, &style, 0, &mut out);
    Ok(Value::from(out))
}

fn sort_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (key, mut item) in entries {
                sort_json(&mut item);
                map.insert(key, item);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_json),
        _ => {}
    }
}

/// How `json.dumps` lays text out.
struct JsonStyle {
    indent: Option<usize>,
    item: String,
    key: String,
    ensure_ascii: bool,
}

impl Default for JsonStyle {
    fn default() -> Self {
        Self { indent: None, item: ", ".into(), key: ": ".into(), ensure_ascii: false }
    }
}

fn write_python_string(text: &str, ensure_ascii: bool, out: &mut String) {
    let escaped = serde_json::Value::String(text.to_string()).to_string();
    if !ensure_ascii {
        out.push_str(&escaped);
        return;
    }
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

/// Python writes exponents with a sign and at least two digits (`1e-05`, `1e+20`).
fn python_float(text: &str) -> String {
    match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exponent.trim_start_matches('+')),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None if !text.contains('.') => format!("{text}.0"),
        None => text.to_string(),
    }
}

fn write_python_json(value: &serde_json::Value, style: &JsonStyle, depth: usize, out: &mut String) {
    let indent = style.indent;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = style.item.as_str();
    match value {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_python_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        serde_json::Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_python_string(key, style.ensure_ascii, out);
                out.push_str(&style.key);
                write_python_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        serde_json::Value::Number(n) if n.is_f64() => out.push_str(&python_float(&n.to_string())),
        serde_json::Value::String(text) => write_python_string(text, style.ensure_ascii, out),
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(format)`: the current UTC time, with the common `strftime`
/// directives (`%Y %y %m %d %e %b %B %a %A %H %M %S %%`).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(secs, &format)
}

fn strftime(unix_secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = (unix_secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS[(days.rem_euclid(7)) as usize];
    let secs_of_day = unix_secs % 86_400;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_like_python() {
        let value = serde_json::json!({"a": [1, 2.0, "é\"<"], "b": {}, "c": null});
        let mut flat = String::new();
        write_python_json(&value, &JsonStyle::default(), 0, &mut flat);
        assert_eq!(flat, r#"{"a": [1, 2.0, "é\"<"], "b": {}, "c": null}"#);
        let mut indented = String::new();
        let style = JsonStyle { indent: Some(4), item: ",".into(), ..Default::default() };
        write_python_json(&serde_json::json!({"a": [1], "b": "x"}), &style, 0, &mut indented);
        assert_eq!(indented, "{\n    \"a\": [\n        1\n    ],\n    \"b\": \"x\"\n}");
    }

    #[test]
    fn tojson_options_follow_python() {
        assert_eq!(python_float("1e-5"), "1e-05");
        assert_eq!(python_float("1e20"), "1e+20");
        assert_eq!(python_float("2"), "2.0");
        let mut ascii = String::new();
        let style = JsonStyle { ensure_ascii: true, ..Default::default() };
        write_python_json(&serde_json::json!({"k": "é😀"}), &style, 0, &mut ascii);
        assert_eq!(ascii, r#"{"k": "\u00e9\ud83d\ude00"}"#);
        let mut sorted = serde_json::json!({"b": 1, "a": {"d": 1, "c": 2}});
        sort_json(&mut sorted);
        assert_eq!(sorted.to_string(), r#"{"a":{"c":2,"d":1},"b":1}"#);
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 is a Friday.
        assert_eq!(strftime(1_721_952_000, "%d %b %Y (%A) %H:%M"), "26 Jul 2024 (Friday) 00:00");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('nope') }}", "", "").unwrap();
        let e = t.render(&Vec::<Message>::new(), None::<&()>, false).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
