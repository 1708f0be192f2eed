"""The transformers side of `swift bench generate` (see docs/PERFORMANCE.md).

Usage: bench_generate_transformers.py MODEL_DIR PROMPT_IDS_JSON NEW_TOKENS THREADS REPEATS
Prints one JSON line: {"prefill_seconds": [...], "decode_seconds": [...], "new_ids"}.
Same work as swift: f32 compute on CPU, one prefill of the prompt, then greedy
decoding one token at a time with the KV cache, REPEATS times.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    folder, prompt_json, new_tokens, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([json.loads(prompt_json)])
    prefills, decodes = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            prefills.append(time.perf_counter() - start)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new_ids = [int(token)]
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                new_ids.append(int(token))
            decodes.append(time.perf_counter() - start)
    print(json.dumps({"prefill_seconds": prefills, "decode_seconds": decodes, "new_ids": new_ids}))


if __name__ == "__main__":
    main()
