//! Stage keys: what decides whether a stage reruns.
//!
//! | enters the key                                   | only provenance      |
//! |--------------------------------------------------|----------------------|
//! | the kind's name and version number               | device, host         |
//! | every parameter, defaults filled in (incl. dtype)| start time, duration |
//! | every input's artifact: type, digest, file name  | absolute paths       |
//! | a resolved upstream revision (Hub commit sha)    |                      |
//! | `${VAR}` values (not their names)                | the manifest's path  |
//!
//! `key = blake3("swift-stage-key-v1\n" + canonical JSON)`, where canonical JSON
//! sorts object keys and has no whitespace. Upstream stages enter through the
//! digests of their outputs, so a stage whose inputs come out byte-identical
//! stays cached even if its upstream reran.

use serde_json::Value;
use swift_cache::{Artifact, StageKey};

const KEY_DOMAIN: &str = "swift-stage-key-v1\n";
const PARAMS_DOMAIN: &str = "swift-stage-params-v1\n";
const RECIPE_DOMAIN: &str = "swift-stage-recipe-v1\n";

/// JSON with object keys sorted at every level and no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The digest of a stage's kind, version and resolved parameters (what
/// `--locked` compares).
pub fn params_digest(kind: &str, version: u32, params: &Value) -> StageKey {
    let text = canonical_json(&serde_json::json!({"kind": kind, "kind_version": version, "params": params}));
    StageKey::of(format!("{PARAMS_DOMAIN}{text}").as_bytes())
}

/// The stage key. `revision` is an upstream revision the stage resolved (a Hub
/// commit sha); stages without one have no `revision` field in their key.
pub fn stage_key(kind: &str, version: u32, params: &Value, revision: Option<&str>, inputs: &[(String, Artifact)]) -> StageKey {
    let inputs: serde_json::Map<String, Value> =
        inputs.iter().map(|(name, artifact)| (name.clone(), serde_json::to_value(artifact).expect("artifacts serialize"))).collect();
    let mut described = serde_json::json!({
        "kind": kind,
        "kind_version": version,
        "params": params,
        "inputs": inputs,
    });
    if let Some(revision) = revision {
        described["revision"] = Value::String(revision.to_string());
    }
    let text = canonical_json(&described);
    StageKey::of(format!("{KEY_DOMAIN}{text}").as_bytes())
}

/// A stage's recipe: what its key will be computed from, known before the
/// stages it reads from have run. Local inputs enter by content, stage inputs
/// by the producer's recipe and output name (`{"recipe": HEX, "output": NAME}`),
/// so equal recipes give equal keys. Slurm job names carry it, which lets a
/// second `swift run` find the job already computing a stage.
pub fn recipe(kind: &str, version: u32, params: &Value, revision: Option<&str>, inputs: &[(String, Value)]) -> StageKey {
    let inputs: serde_json::Map<String, Value> = inputs.iter().cloned().collect();
    let described = serde_json::json!({
        "kind": kind,
        "kind_version": version,
        "params": params,
        "revision": revision,
        "inputs": inputs,
    });
    StageKey::of(format!("{RECIPE_DOMAIN}{}", canonical_json(&described)).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use swift_cache::ContentDigest;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": "s"}});
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"s","y":[1,{"c":3,"d":2}]},"b":1}"#);
    }

    #[test]
    fn key_depends_on_every_part_and_not_on_key_order() {
        let file = |bytes: &[u8]| Artifact::File { digest: ContentDigest::of(bytes), size: 1, name: "d.jsonl".into(), executable: false };
        let base = stage_key("k", 1, &json!({"a": 1, "b": 2}), None, &[("data".into(), file(b"x"))]);
        assert_eq!(base, stage_key("k", 1, &json!({"b": 2, "a": 1}), None, &[("data".into(), file(b"x"))]));
        assert_ne!(base, stage_key("k", 2, &json!({"a": 1, "b": 2}), None, &[("data".into(), file(b"x"))]));
        assert_ne!(base, stage_key("k", 1, &json!({"a": 1, "b": 3}), None, &[("data".into(), file(b"x"))]));
        assert_ne!(base, stage_key("k", 1, &json!({"a": 1, "b": 2}), None, &[("data".into(), file(b"y"))]));
        assert_ne!(base, stage_key("j", 1, &json!({"a": 1, "b": 2}), None, &[("data".into(), file(b"x"))]));
        assert_ne!(base, stage_key("k", 1, &json!({"a": 1, "b": 2}), Some("abc"), &[("data".into(), file(b"x"))]));
    }
}
