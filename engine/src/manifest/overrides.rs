//! `${VAR}` interpolation and `--set key.path=value` overrides, applied to the
//! parsed document before it is typed.

use toml_edit::{DocumentMut, Item, Table, Value};

/// Rewrites one string value (given its key path): `Ok(None)` keeps it.
pub type StringRewrite<'a> = dyn FnMut(&[String], &str) -> Result<Option<String>, String> + 'a;

/// Replaces `${VAR}` (or `${VAR:-default}`) in a string with the variable's
/// value; `$$` stands for a literal `$`. Returns the name of an unset variable.
pub fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| format!("unclosed `${{` in {text:?}"))?;
            let spec = &body[..end];
            let (name, default) = match spec.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (spec, None),
            };
            match lookup(name).or_else(|| default.map(str::to_string)) {
                Some(value) => out.push_str(&value),
                None => return Err(name.to_string()),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Applies `f` to every string value in the document, with its key path.
pub fn map_strings(
    table: &mut Table,
    path: &mut Vec<String>,
    f: &mut StringRewrite<'_>,
) -> Result<(), (Vec<String>, String)> {
    for (key, item) in table.iter_mut() {
        path.push(key.get().to_string());
        match item {
            Item::Table(t) => map_strings(t, path, f)?,
            Item::Value(v) => map_value(v, path, f)?,
            Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter_mut().enumerate() {
                    path.push(i.to_string());
                    map_strings(t, path, f)?;
                    path.pop();
                }
            }
            Item::None => {}
        }
        path.pop();
    }
    Ok(())
}

fn map_value(
    value: &mut Value,
    path: &mut Vec<String>,
    f: &mut StringRewrite<'_>,
) -> Result<(), (Vec<String>, String)> {
    match value {
        Value::String(s) => {
            if let Some(new) = f(path, s.value()).map_err(|e| (path.clone(), e))? {
                let decor = s.decor().clone();
                *value = Value::from(new);
                *value.decor_mut() = decor;
            }
        }
        Value::Array(array) => {
            for (i, v) in array.iter_mut().enumerate() {
                path.push(i.to_string());
                map_value(v, path, f)?;
                path.pop();
            }
        }
        Value::InlineTable(table) => {
            for (key, v) in table.iter_mut() {
                path.push(key.get().to_string());
                map_value(v, path, f)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Sets `path` (already split on dots) to `raw`, parsed as a TOML value when it
/// is one (`32`, `true`, `["a", "b"]`), else taken as a string.
pub fn set_path(doc: &mut DocumentMut, path: &[String], raw: &str) -> Result<(), String> {
    let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw));
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut item: &mut Item = doc.as_item_mut();
    for (depth, segment) in parents.iter().enumerate() {
        let shown = path[..=depth].join(".");
        item = match item {
            Item::Table(table) => table.entry(segment).or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(true);
                Item::Table(t)
            }),
            Item::Value(Value::InlineTable(table)) => {
                let v = table.entry(segment).or_insert_with(|| Value::InlineTable(Default::default()));
                // Inline tables hold values, not items: continue through a shim.
                return set_in_value(v, &path[depth + 1..], value, &shown);
            }
            _ => return Err(format!("`{}` is not a table", path[..depth].join("."))),
        };
    }
    match item {
        Item::Table(table) => {
            table.insert(last, Item::Value(value));
            Ok(())
        }
        Item::Value(Value::InlineTable(table)) => {
            table.insert(last, value);
            Ok(())
        }
        _ => Err(format!("`{}` is not a table", parents.join("."))),
    }
}

fn set_in_value(target: &mut Value, rest: &[String], value: Value, shown: &str) -> Result<(), String> {
    let Value::InlineTable(table) = target else { return Err(format!("`{shown}` is not a table")) };
    match rest {
        [last] => {
            table.insert(last, value);
            Ok(())
        }
        [first, tail @ ..] => {
            let next = table.entry(first).or_insert_with(|| Value::InlineTable(Default::default()));
            set_in_value(next, tail, value, &format!("{shown}.{first}"))
        }
        [] => Err("empty key".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/u".to_string())
    }

    #[test]
    fn interpolates_defaults_and_escapes() {
        assert_eq!(interpolate("${HOME_DIR}/data", &env).unwrap(), "/home/u/data");
        assert_eq!(interpolate("${NOPE:-x}-$$-$", &env).unwrap(), "x-$-$");
        assert_eq!(interpolate("${NOPE}", &env), Err("NOPE".to_string()));
    }

    #[test]
    fn set_replaces_and_creates_keys() {
        let mut doc: DocumentMut = "[stages.a]\nlora = { rank = 8 }\n".parse().unwrap();
        let split = |s: &str| s.split('.').map(str::to_string).collect::<Vec<_>>();
        set_path(&mut doc, &split("stages.a.lora.rank"), "32").unwrap();
        set_path(&mut doc, &split("stages.a.name"), "hello world").unwrap();
        let table: toml::Table = toml::from_str(&doc.to_string()).unwrap();
        assert_eq!(table["stages"]["a"]["lora"]["rank"].as_integer(), Some(32));
        assert_eq!(table["stages"]["a"]["name"].as_str(), Some("hello world"));
        assert!(set_path(&mut doc, &split("stages.a.lora.rank.x"), "1").is_err());
    }
}
