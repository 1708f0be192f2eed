//! The `gguf` export: the merged model as a GGUF file (version 3) for
//! llama.cpp and ollama, written as llama.cpp's `convert_hf_to_gguf.py` names
//! and lays out Qwen2 and Llama checkpoints (Mistral as `llama`):
//!
//! - tensors renamed (`model.layers.0.self_attn.q_proj.weight` →
//!   `blk.0.attn_q.weight`), Llama's q/k rows permuted back to llama.cpp's
//!   rotary order, 1-D tensors (norms, biases) in f32, matrices in the chosen
//!   type (`q8_0` falls back to f16 for a matrix whose rows are not a multiple
//!   of 32, as llama.cpp does);
//! - the hyper-parameters under `{arch}.*`, the BPE vocabulary, merges, special
//!   tokens and chat template under `tokenizer.*`.
//!
//! Tensors are merged, converted and written one at a time.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::merged::MergedWeights;
use crate::llm::config::Family;
use crate::llm::save::TensorPlan;
use crate::llm::{ModelConfig, TextTokenizer};
use crate::model_source::OpenedModel;

/// GGUF's tensor data alignment (`general.alignment`'s default).
const ALIGNMENT: u64 = 32;

/// The type a GGUF file stores its matrices in.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum GgufType {
    /// IEEE half precision.
    #[serde(rename = "f16")]
    F16,
    /// 8-bit blocks of 32 with an f16 scale.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl GgufType {
    /// The name in file names and manifests.
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }
}

/// How one tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stored {
    F32,
    F16,
    Q8_0,
}

impl Stored {
    fn ggml_type(self) -> u32 {
        match self {
            Stored::F32 => 0,
            Stored::F16 => 1,
            Stored::Q8_0 => 8,
        }
    }

    fn bytes(self, elements: usize) -> u64 {
        (match self {
            Stored::F32 => elements * 4,
            Stored::F16 => elements * 2,
            Stored::Q8_0 => elements / 32 * 34,
        }) as u64
    }

    fn encode(self, tensor: &Tensor) -> anyhow::Result<Vec<u8>> {
        let tensor = tensor.to_dtype(DType::F32)?.contiguous()?;
        Ok(match self {
            Stored::F32 => tensor.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Stored::F16 => QTensor::quantize(&tensor, GgmlDType::F16)?.data()?.into_owned(),
            Stored::Q8_0 => QTensor::quantize(&tensor, GgmlDType::Q8_0)?.data()?.into_owned(),
        })
    }
}

/// One tensor of the file: where it comes from and how it is stored.
struct Entry {
    source: TensorPlan,
    name: String,
    stored: Stored,
}

/// Writes the merged model of `model` as one GGUF file of type `ty`.
pub fn write(path: &Path, model: &OpenedModel, ty: GgufType, title: &str) -> anyhow::Result<()> {
    let config = ModelConfig::load(&model.folder)?;
    if config.rope_scaling.is_some() {
        bail!("GGUF export does not handle Llama 3.1-style rope scaling yet (config.json `rope_scaling`); export `merged` and convert with llama.cpp's convert_hf_to_gguf.py");
    }
    let arch = match config.family {
        Family::Qwen2 => "qwen2",
        Family::Llama | Family::Mistral => "llama",
    };
    let merged = MergedWeights::open(model)?;
    let mut entries = Vec::new();
    for source in merged.plan()? {
        let Some(name) = gguf_name(&source.name) else {
            if source.name.ends_with("rotary_emb.inv_freq") {
                continue; // recomputed from rope.freq_base
            }
            bail!("tensor `{}` has no GGUF name: swift exports the tensors of Qwen2, Llama and Mistral decoders", source.name);
        };
        let stored = match (source.shape.as_slice(), ty) {
            ([_], _) => Stored::F32,
            (_, GgufType::F16) => Stored::F16,
            ([_, cols], GgufType::Q8_0) if cols % 32 == 0 => Stored::Q8_0,
            (_, GgufType::Q8_0) => Stored::F16,
        };
        entries.push(Entry { source, name, stored });
    }
    let metadata = metadata(&model.folder, &config, arch, ty, title)?;

    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let io = |e: std::io::Error| anyhow::Error::new(e).context(format!("writing {}", path.display()));
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in &metadata {
        put_string(&mut head, key);
        value.put(&mut head);
    }
    let mut offset = 0u64;
    for entry in &entries {
        put_string(&mut head, &entry.name);
        head.extend_from_slice(&(entry.source.shape.len() as u32).to_le_bytes());
        for dim in entry.source.shape.iter().rev() {
            head.extend_from_slice(&(*dim as u64).to_le_bytes());
        }
        head.extend_from_slice(&entry.stored.ggml_type().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += padded(entry.stored.bytes(entry.source.shape.iter().product()));
    }
    head.resize(padded(head.len() as u64) as usize, 0);
    out.write_all(&head).map_err(io)?;
    for entry in &entries {
        let tensor = merged.tensor(&entry.source)?;
        let tensor = match (config.family, entry.source.name.rsplit('.').nth(1)) {
            (Family::Llama | Family::Mistral, Some("q_proj")) => unpermute_rotary(&tensor, config.num_heads)?,
            (Family::Llama | Family::Mistral, Some("k_proj")) => unpermute_rotary(&tensor, config.num_kv_heads)?,
            _ => tensor,
        };
        let mut data = entry.stored.encode(&tensor).with_context(|| format!("converting `{}`", entry.source.name))?;
        let expected = entry.stored.bytes(entry.source.shape.iter().product());
        if data.len() as u64 != expected {
            bail!("internal error: `{}` encoded to {} bytes, planned {expected}", entry.source.name, data.len());
        }
        data.resize(padded(expected) as usize, 0);
        out.write_all(&data).map_err(io)?;
    }
    merged.check_all_applied()?;
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}

fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// llama.cpp's name for a checkpoint tensor.
fn gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    matches!(suffix, "weight" | "bias").then(|| format!("blk.{layer}.{short}.{suffix}"))
}

/// Llama checkpoints in HF layout rotate the two halves of each head; llama.cpp
/// rotates interleaved pairs. This is `convert_hf_to_gguf.py`'s `permute`: per
/// head, rows `[2, d/2]` → `[d/2, 2]` (a weight `[heads·d, in]` or a bias `[heads·d]`).
fn unpermute_rotary(tensor: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = tensor.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    tensor.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

/// GGUF's value type tags.
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

impl Value {
    fn put(&self, out: &mut Vec<u8>) {
        let tag = |t: u32, out: &mut Vec<u8>| out.extend_from_slice(&t.to_le_bytes());
        match self {
            Value::U32(v) => {
                tag(TYPE_U32, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::F32(v) => {
                tag(TYPE_F32, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::Bool(v) => {
                tag(TYPE_BOOL, out);
                out.push(u8::from(*v));
            }
            Value::Str(s) => {
                tag(TYPE_STRING, out);
                put_string(out, s);
            }
            Value::Strings(items) => {
                tag(TYPE_ARRAY, out);
                tag(TYPE_STRING, out);
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|s| put_string(out, s));
            }
            Value::I32s(items) => {
                tag(TYPE_ARRAY, out);
                tag(TYPE_I32, out);
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The hyper-parameters and tokenizer, as llama.cpp reads them.
fn metadata(folder: &Path, config: &ModelConfig, arch: &str, ty: GgufType, title: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let u = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(title.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    for (key, value) in [
        ("context_length", u(config.max_position_embeddings)),
        ("embedding_length", u(config.hidden_size)),
        ("block_count", u(config.num_layers)),
        ("feed_forward_length", u(config.intermediate_size)),
        ("attention.head_count", u(config.num_heads)),
        ("attention.head_count_kv", u(config.num_kv_heads)),
        ("attention.key_length", u(config.head_dim)),
        ("attention.value_length", u(config.head_dim)),
        ("rope.dimension_count", u(config.head_dim)),
        ("rope.freq_base", Value::F32(config.rope_theta as f32)),
        ("attention.layer_norm_rms_epsilon", Value::F32(config.rms_norm_eps as f32)),
        ("vocab_size", u(config.vocab_size)),
    ] {
        meta.push((format!("{arch}.{key}"), value));
    }
    meta.extend(tokenizer_metadata(folder, config)?);
    Ok(meta)
}

/// `tokenizer.ggml.*` from a BPE `tokenizer.json` (Qwen2, Llama 3), padded to
/// the embedding's rows as llama.cpp pads (`[PAD{id}]`, unused).
fn tokenizer_metadata(folder: &Path, config: &ModelConfig) -> anyhow::Result<Vec<(String, Value)>> {
    let path = folder.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!("{}: GGUF export handles byte-level BPE tokenizers (Qwen2, Llama 3); this one is {}", path.display(), model["type"]);
    }
    let mut tokens: Vec<Option<(String, i32)>> = Vec::new();
    let mut set = |id: u64, token: &str, kind: i32| {
        let id = id as usize;
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some((token.to_string(), kind));
    };
    for (token, id) in model["vocab"].as_object().context("tokenizer.json has no model.vocab")? {
        set(id.as_u64().context("a vocab id is not a number")?, token, NORMAL);
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else { continue };
        set(id, content, if added["special"].as_bool() == Some(true) { CONTROL } else { USER_DEFINED });
    }
    if tokens.len() < config.vocab_size {
        tokens.resize(config.vocab_size, None);
    }
    let (names, kinds): (Vec<String>, Vec<i32>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED)))
        .unzip();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .context("tokenizer.json has no model.merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""))),
            other => bail!("{}: merge {other} is neither \"a b\" nor [a, b]", path.display()),
        })
        .collect::<anyhow::Result<_>>()?;
    let tokenizer = TextTokenizer::load(folder, config)?;
    let id_of = |token: Option<&str>| token.and_then(|t| tokenizer.token_id(t));
    let eos = id_of(tokenizer.eos_token()).or(config.eos_token_ids.first().copied());
    let bos = id_of(tokenizer.bos_token()).or(config.bos_token_id);
    let adds_bos = bos.is_some_and(|bos| tokenizer.encode("a").ok().and_then(|ids| ids.first().copied()) == Some(bos));
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre_tokenizer(&json, &path)?.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Strings(names)),
        ("tokenizer.ggml.token_type".to_string(), Value::I32s(kinds)),
        ("tokenizer.ggml.merges".to_string(), Value::Strings(merges)),
    ];
    for (key, id) in [("bos_token_id", bos), ("eos_token_id", eos), ("padding_token_id", id_of(tokenizer.pad_token()))] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    meta.push(("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(adds_bos)));
    if let Some(template) = tokenizer.chat_template_source() {
        meta.push(("tokenizer.chat_template".to_string(), Value::Str(template.to_string())));
    }
    Ok(meta)
}

/// llama.cpp's `tokenizer.ggml.pre`: the name of the split `tokenizer.json`'s
/// `pre_tokenizer` does (llama.cpp and transformers pick their split regex by
/// it, so a wrong name tokenizes differently).
fn pre_tokenizer(json: &serde_json::Value, path: &Path) -> anyhow::Result<&'static str> {
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let pre = &json["pre_tokenizer"];
    let byte_level = |v: &serde_json::Value, regex: bool| v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex;
    if byte_level(pre, true) {
        return Ok("gpt-2");
    }
    if let Some([split, bytes]) = pre["pretokenizers"].as_array().map(Vec::as_slice) {
        if pre["type"] == "Sequence" && split["type"] == "Split" && byte_level(bytes, false) {
            match split["pattern"]["Regex"].as_str() {
                Some(QWEN2) => return Ok("qwen2"),
                Some(LLAMA3) => return Ok("llama-bpe"),
                _ => {}
            }
        }
    }
    bail!("{}: GGUF export knows llama.cpp's names for the GPT-2, Qwen2 and Llama 3 pre-tokenizers only, not {pre}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(gguf_name("model.layers.11.self_attn.q_proj.bias").unwrap(), "blk.11.attn_q.bias");
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(), "blk.0.ffn_down.weight");
        assert_eq!(gguf_name("model.layers.3.post_attention_layernorm.weight").unwrap(), "blk.3.ffn_norm.weight");
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.x.mlp.up_proj.weight").is_none());
        assert!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
    }

    #[test]
    fn rotary_unpermute_interleaves_each_heads_halves() {
        // One head of dimension 4: rows [r0, r1 | r2, r3] → [r0, r2, r1, r3].
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((4, 2)).unwrap();
        let p = unpermute_rotary(&w, 1).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(p, vec![vec![0.0, 1.0], vec![4.0, 5.0], vec![2.0, 3.0], vec![6.0, 7.0]]);
        let b = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
        assert_eq!(unpermute_rotary(&b, 2).unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn the_pre_tokenizer_is_named_from_tokenizer_json() {
        let path = Path::new("tokenizer.json");
        let gpt2 = serde_json::json!({ "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "use_regex": true } });
        assert_eq!(pre_tokenizer(&gpt2, path).unwrap(), "gpt-2");
        let qwen2_regex = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let qwen2 = serde_json::json!({ "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": qwen2_regex }, "behavior": "Isolated", "invert": false },
            { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false } ] } });
        assert_eq!(pre_tokenizer(&qwen2, path).unwrap(), "qwen2");
        let other = serde_json::json!({ "pre_tokenizer": { "type": "Whitespace" } });
        assert!(pre_tokenizer(&other, path).unwrap_err().to_string().contains("pre-tokenizers only"));
    }

    #[test]
    fn stored_sizes_match_the_encodings() {
        let t = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
        for stored in [Stored::F32, Stored::F16, Stored::Q8_0] {
            assert_eq!(stored.encode(&t).unwrap().len() as u64, stored.bytes(256), "{stored:?}");
        }
    }
}
