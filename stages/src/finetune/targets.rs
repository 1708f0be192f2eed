//! Which projections get an adapter: `targets` (module names, or
//! `"all-linear"`) and `layers` (`"all"`, `"last 8"`, `"first 4"`, `"0-3"`,
//! `"2,5,7"`, or a list of indices; negative indices count from the end).

use serde::{Deserialize, Serialize};

/// The decoder's linear modules (Qwen2, Llama and Mistral name them alike);
/// `"all-linear"` means all of them, never `lm_head` (as in PEFT).
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The `targets` key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// `"all-linear"`.
    Named(String),
    /// Module names, e.g. `["q_proj", "v_proj"]`.
    List(Vec<String>),
}

impl Default for Targets {
    fn default() -> Self {
        Targets::Named("all-linear".into())
    }
}

impl Targets {
    /// The module names, validated (errors name the bad entry and the choices).
    pub fn modules(&self) -> Result<Vec<String>, String> {
        match self {
            Targets::Named(name) if name == "all-linear" => Ok(LINEAR_MODULES.iter().map(|m| m.to_string()).collect()),
            Targets::Named(other) => {
                Err(format!("unknown targets `{other}`: use \"all-linear\" or a list such as [\"q_proj\", \"v_proj\"]"))
            }
            Targets::List(list) if list.is_empty() => Err("targets is empty: name at least one module".into()),
            Targets::List(list) => {
                let mut modules = Vec::new();
                for name in list {
                    if !LINEAR_MODULES.contains(&name.as_str()) {
                        let hint = LINEAR_MODULES
                            .iter()
                            .min_by_key(|m| strsim_distance(m, name))
                            .map(|m| format!(" (did you mean `{m}`?)"))
                            .unwrap_or_default();
                        return Err(format!(
                            "unknown target module `{name}`{hint}; the decoder's linear modules are {}",
                            LINEAR_MODULES.join(", ")
                        ));
                    }
                    if !modules.contains(name) {
                        modules.push(name.clone());
                    }
                }
                Ok(modules)
            }
        }
    }
}

/// Edit distance for suggestions.
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            current.push((previous[j] + cost).min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// The `layers` key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    /// `"all"`, `"last N"`, `"first N"`, `"A-B"`, `"A,B,C"`.
    Spec(String),
    /// Indices; negative ones count from the end.
    List(Vec<i64>),
}

impl Default for Layers {
    fn default() -> Self {
        Layers::Spec("all".into())
    }
}

impl Layers {
    /// Checks the syntax (the range needs the model, see [`Layers::resolve`]):
    /// resolved against [`SYNTAX_LAYERS`] layers, where only syntax errors
    /// count, so that no spec builds more indices than that.
    pub fn check(&self) -> Result<(), String> {
        match self.resolve_or_range_error(SYNTAX_LAYERS) {
            Ok(_) | Err(LayersError::Range(_)) => Ok(()),
            Err(LayersError::Syntax(message)) => Err(message),
        }
    }

    /// The layer indices for a model of `num_layers` layers (`None` = all),
    /// sorted and deduplicated.
    pub fn resolve(&self, num_layers: usize) -> Result<Option<Vec<usize>>, String> {
        self.resolve_or_range_error(num_layers).map_err(|e| match e {
            LayersError::Syntax(message) | LayersError::Range(message) => message,
        })
    }

    fn resolve_or_range_error(&self, num_layers: usize) -> Result<Option<Vec<usize>>, LayersError> {
        use LayersError::{Range, Syntax};
        let out_of_range = |i: i64| {
            Range(format!("layer {i} is out of range: the model has {num_layers} layers (0 to {})", num_layers.saturating_sub(1)))
        };
        let index = |i: i64| -> Result<usize, LayersError> {
            let n = num_layers as i64;
            let resolved = if i < 0 { n + i } else { i };
            if resolved < 0 || resolved >= n {
                return Err(out_of_range(i));
            }
            Ok(resolved as usize)
        };
        let mut indices: Vec<usize> = match self {
            Layers::List(list) if list.is_empty() => return Err(Syntax("layers is empty".into())),
            Layers::List(list) => list.iter().map(|&i| index(i)).collect::<Result<_, _>>()?,
            Layers::Spec(spec) => {
                let spec = spec.trim();
                let count = |rest: &str| -> Result<usize, LayersError> {
                    let n: usize = rest.trim().parse().map_err(|_| Syntax(format!("`{spec}`: expected a number after the word")))?;
                    if n == 0 {
                        return Err(Syntax(format!("`{spec}`: the count must be at least 1")));
                    }
                    if n > num_layers {
                        return Err(Range(format!("`{spec}`: the model has {num_layers} layers")));
                    }
                    Ok(n)
                };
                if spec == "all" {
                    return Ok(None);
                } else if let Some(rest) = spec.strip_prefix("last ") {
                    let n = count(rest)?;
                    (num_layers - n..num_layers).collect()
                } else if let Some(rest) = spec.strip_prefix("first ") {
                    (0..count(rest)?).collect()
                } else {
                    let mut indices = Vec::new();
                    for part in spec.split(',') {
                        let parse = |s: &str| -> Result<i64, LayersError> {
                            s.trim().parse().map_err(|_| {
                                Syntax(format!("`{spec}`: use \"all\", \"last 8\", \"first 4\", a range \"0-3\" or a list \"2,5,7\""))
                            })
                        };
                        match part.split_once('-').filter(|(a, _)| !a.trim().is_empty()) {
                            Some((a, b)) => {
                                let (a, b) = (index(parse(a)?)?, index(parse(b)?)?);
                                if a > b {
                                    return Err(Syntax(format!("`{spec}`: the range {a}-{b} is backwards")));
                                }
                                indices.extend(a..=b);
                            }
                            None => indices.push(index(parse(part)?)?),
                        }
                    }
                    indices
                }
            }
        };
        indices.sort_unstable();
        indices.dedup();
        Ok(if indices.len() == num_layers { None } else { Some(indices) })
    }
}

/// Layers a spec is checked against before the model is known: more than
/// any model has, few enough that resolving never allocates much.
const SYNTAX_LAYERS: usize = 1 << 16;

/// Why a layer spec does not resolve.
enum LayersError {
    /// It cannot be read.
    Syntax(String),
    /// It names layers the model does not have.
    Range(String),
}

/// The modules and layers that get an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Module names.
    pub modules: Vec<String>,
    /// Layer indices, `None` for all.
    pub layers: Option<Vec<usize>>,
}

impl Selection {
    /// Whether the projection at `path` (`model.layers.3.self_attn.q_proj`) is selected.
    pub fn selects(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix("model.layers.") else { return false };
        let Some((layer, module_path)) = rest.split_once('.') else { return false };
        let Ok(layer) = layer.parse::<usize>() else { return false };
        let module = module_path.rsplit('.').next().unwrap_or(module_path);
        self.modules.iter().any(|m| m == module) && self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_specs() {
        let r = |s: &str| Layers::Spec(s.into()).resolve(12);
        assert_eq!(r("all").unwrap(), None);
        assert_eq!(r("last 3").unwrap(), Some(vec![9, 10, 11]));
        assert_eq!(r("first 2").unwrap(), Some(vec![0, 1]));
        assert_eq!(r("2-4,7").unwrap(), Some(vec![2, 3, 4, 7]));
        assert_eq!(Layers::List(vec![-1, 0]).resolve(12).unwrap(), Some(vec![0, 11]));
        assert_eq!(r("0-11").unwrap(), None);
        assert!(r("12").unwrap_err().contains("layer 12 is out of range: the model has 12 layers (0 to 11)"));
        assert!(r("last 20").unwrap_err().contains("the model has 12 layers"));
        assert!(Layers::Spec("last 0".into()).check().unwrap_err().contains("at least 1"));
        assert!(r("middle").unwrap_err().contains("use \"all\""));
        assert!(r("5-2").unwrap_err().contains("backwards"));
    }

    #[test]
    fn targets_and_selection() {
        assert_eq!(Targets::default().modules().unwrap().len(), 7);
        let e = Targets::List(vec!["q_prj".into()]).modules().unwrap_err();
        assert!(e.contains("unknown target module `q_prj` (did you mean `q_proj`?)"), "{e}");
        assert!(Targets::Named("everything".into()).modules().is_err());
        let s = Selection { modules: vec!["q_proj".into(), "down_proj".into()], layers: Some(vec![1]) };
        assert!(s.selects("model.layers.1.self_attn.q_proj"));
        assert!(s.selects("model.layers.1.mlp.down_proj"));
        assert!(!s.selects("model.layers.0.self_attn.q_proj"));
        assert!(!s.selects("model.layers.1.self_attn.k_proj"));
        assert!(!s.selects("lm_head"));
    }
}
