"""The transformers side of `swift bench generate` (see docs/PERFORMANCE.md).

Usage: bench_generate_transformers.py MODEL_DIR PROMPT_IDS_JSON NEW_TOKENS THREADS REPEATS [DTYPE]
(DTYPE: float32, the default, or bfloat16.) Prints one JSON line: {"prefill_seconds": [...], "decode_seconds": [...], "new_ids"}.
Same work as swift: f32 compute on CPU, one prefill of the prompt, then greedy
decoding one token at a time with the KV cache, REPEATS times.

Usage: bench_generate_transformers.py MODEL_DIR batch PROMPT_TOKENS NEW_TOKENS THREADS COUNTS_JSON
Prints one JSON line: {"decode_tokens_per_s": {N: rate}, "peak_rss_mib"}. For
each N, `generate` on N prompts at once (the same pseudo-random prompts as
swift's, left-padded to one length, greedy, exactly NEW_TOKENS each); the
decode rate is N × (NEW_TOKENS − 1) over the time beyond the same call with
one new token.
"""

import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def prompt_of(s, tokens, vocab):
    return [((i * 2654435761 + i + s * 7919) & 0xFFFFFFFF) % vocab for i in range(tokens)]


def batches(folder, prompt_tokens, new_tokens, threads, counts):
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rates = {}
    with torch.inference_mode():
        # One call first, so no measured call pays generate's first-call setup.
        model.generate(input_ids=torch.tensor([prompt_of(0, 8, vocab)]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        for n in counts:
            ids = torch.tensor([prompt_of(s, prompt_tokens, vocab) for s in range(n)])
            mask = torch.ones_like(ids)

            def run(tokens):
                start = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=0)
                return time.perf_counter() - start

            prefill = run(1)
            total = run(new_tokens)
            rates[str(n)] = n * (new_tokens - 1) / max(total - prefill, 1e-9)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"decode_tokens_per_s": rates, "peak_rss_mib": rss}))


def main():
    if sys.argv[2] == "batch":
        folder, prompt_tokens, new_tokens, threads = sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        batches(folder, prompt_tokens, new_tokens, threads, json.loads(sys.argv[6]))
        return
    folder, prompt_json, new_tokens, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float32
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
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
