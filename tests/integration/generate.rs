use std::path::Path;

use crate::util::Project;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name).to_str().unwrap().to_string()
}

#[test]
fn generate_prints_ids_and_text_as_json() {
    let p = Project::new();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/reference.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["qwen2-tiny"][0];
    let run = p.swift(&["generate", "--model", &fixture("qwen2-tiny"), "--prompt", case["prompt"].as_str().unwrap(), "--max-tokens", "12", "--json"]);
    assert_eq!(run.code, 0, "{run}");
    let json = run.json();
    assert_eq!(json["prompt_ids"], case["ids"]);
    // transformers' greedy continuation, except that swift stops at an eos id (kept).
    let greedy: Vec<u64> = serde_json::from_value(case["greedy"].clone()).unwrap();
    let eos = [2u64, 0];
    let stop = greedy.iter().position(|id| eos.contains(id)).map_or(greedy.len(), |i| i + 1);
    assert_eq!(json["new_ids"], serde_json::json!(greedy[..stop]));
    assert!(json["text"].is_string());
}

#[test]
fn generate_with_chat_template_and_sampling_is_seeded() {
    let p = Project::new();
    let args = |seed: &str| {
        vec!["generate", "--model", "", "--prompt", "What is Statute 12-B?", "--chat", "--temperature", "0.8", "--top-p", "0.9", "--seed", seed, "--max-tokens", "8", "--json"]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let run = |seed: &str| {
        let mut a = args(seed);
        a[2] = fixture("llama-tiny");
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let run = p.swift(&refs);
        assert_eq!(run.code, 0, "{run}");
        run.json()
    };
    let one = run("7");
    assert_eq!(one, run("7"), "same seed, same tokens");
    let prompt_ids = one["prompt_ids"].as_array().unwrap();
    assert_eq!(prompt_ids[0], 3, "the Llama-3 template starts with <|begin_of_text|>");
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    let p = Project::new();
    let copy = |name: &str| {
        let src = Path::new(&fixture("qwen2-tiny")).to_path_buf();
        let dst = p.path(name);
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
        dst
    };
    let truncated = copy("truncated");
    let bytes = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let lying = copy("lying");
    let mut bytes = std::fs::read(lying.join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(lying.join("model.safetensors"), &bytes).unwrap();
    let shape = copy("shape");
    let config = std::fs::read_to_string(shape.join("config.json")).unwrap().replace("\"intermediate_size\": 256", "\"intermediate_size\": 384");
    std::fs::write(shape.join("config.json"), config).unwrap();
    let unknown = copy("unknown");
    let config = std::fs::read_to_string(unknown.join("config.json")).unwrap().replace("\"model_type\": \"qwen2\"", "\"model_type\": \"gpt2\"");
    std::fs::write(unknown.join("config.json"), config).unwrap();
    for (folder, needle) in [
        (truncated, "model.safetensors: not a valid safetensors file"),
        (lying, "model.safetensors: not a valid safetensors file"),
        (shape, "tensor `model.layers.0.mlp.gate_proj.weight` has shape [256, 128], but config.json implies [384, 128]"),
        (unknown, "config.json: model_type \"gpt2\" is not supported"),
    ] {
        let run = p.swift(&["generate", "--model", folder.to_str().unwrap(), "--prompt", "x", "--max-tokens", "1"]);
        assert_eq!(run.code, 1, "{run}");
        assert!(run.stderr.contains(needle), "expected {needle:?}\n{run}");
    }
}

/// A prompt longer than the model's context (512 positions) is refused with
/// the numbers, at once and without a context-sized allocation; a long
/// answer stops at the context with `finish_reason: "length"`.
#[test]
fn the_context_bounds_prompts_and_answers() {
    let p = Project::new();
    let long = "the court held that the notice was late ".repeat(400);
    let run = p.swift(&["generate", "--model", &fixture("qwen2-tiny"), "--prompt", &long, "--max-tokens", "4"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("and the model's context is 512 (max_position_embeddings"), "{run}");
    let prompt = "word ".repeat(120);
    let run = p.swift(&["generate", "--model", &fixture("qwen2-tiny"), "--prompt", &prompt, "--max-tokens", "100000", "--json"]);
    assert_eq!(run.code, 0, "{run}");
    let json = run.json();
    let (prompt_len, new_len) = (json["prompt_ids"].as_array().unwrap().len(), json["new_ids"].as_array().unwrap().len());
    assert!(prompt_len + new_len <= 512, "{prompt_len} + {new_len} tokens past the context");
    assert!(["stop", "length"].contains(&json["finish_reason"].as_str().unwrap()), "{json}");
    if json["finish_reason"] == "length" {
        assert_eq!(prompt_len + new_len, 512, "{json}");
        assert!(run.stderr.contains("fill the model's context (512 tokens)"), "{run}");
    }
}

#[test]
fn prompt_files_take_chat_messages_and_name_bad_lines() {
    let p = crate::util::Project::new();
    let model = fixture("qwen2-tiny");
    let chat = r#"{"messages": [{"role": "user", "content": "Who pays the rent?"}]}"#;
    p.write("prompts.jsonl", &format!("{chat}\n{{\"prompt\": \"Who pays the rent?\"}}\n"));
    let run = p.swift(&["generate", "--model", &model, "--prompt-file", "prompts.jsonl", "--max-tokens", "4", "--chat"]);
    assert_eq!(run.code, 0, "{run}");
    let lines: Vec<serde_json::Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["prompt_ids"], lines[1]["prompt_ids"], "messages render as --chat wraps a prompt");
    let alone = p.swift(&["generate", "--model", &model, "--prompt", "Who pays the rent?", "--chat", "--max-tokens", "4", "--json"]);
    let alone: serde_json::Value = serde_json::from_str(alone.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(lines[0]["new_ids"], alone["new_ids"]);

    p.write("bad.jsonl", &format!("{chat}\n{{\"messages\": 3}}\n"));
    let run = p.swift(&["generate", "--model", &model, "--prompt-file", "bad.jsonl"]);
    assert!(run.code == 1 && run.stderr.contains("bad.jsonl:2: not a prompt object"), "{run}");
    p.write("long.txt", &format!("short\n{}\n", "word ".repeat(600)));
    let run = p.swift(&["generate", "--model", &model, "--prompt-file", "long.txt"]);
    assert!(run.code == 1 && run.stderr.contains("line 2: the prompt has"), "{run}");
    let run = p.swift(&["generate", "--model", &model]);
    assert_eq!(run.code, 2, "--prompt or --prompt-file is required: {run}");
}
