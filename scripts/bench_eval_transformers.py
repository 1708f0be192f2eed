"""Peer of `swift bench eval --python .venv/bin/python`: scores the same
5-shot MMLU-style questions with transformers, one question per forward pass
over the whole prompt (what lm-evaluation-harness's HF backend does for
single-token continuations), float32 on CPU. Builds the prompts exactly as
lm-eval's MMLU template does, with the model folder's tokenizer.json. Prints one JSON line: seconds (the scoring loop
only, not the model load), questions, and the chosen letters.
"""

import argparse
import csv
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

LETTERS = ["A", "B", "C", "D"]


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def example(row):
    text = row[0].strip()
    for letter, choice in zip(LETTERS, row[1:5]):
        text += f"\n{letter}. {choice}"
    return text + "\nAnswer:"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # The folder's tokenizer.json, as swift reads it: for model_type qwen2,
    # AutoTokenizer would build Qwen2Tokenizer's own pre-tokenizer instead.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    subject = "bench_subject"
    dev = rows(os.path.join(args.data, "data", "dev", f"{subject}_dev.csv"))
    test = rows(os.path.join(args.data, "data", "test", f"{subject}_test.csv"))
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    shots = "".join(example(r) + " " + r[5] + "\n\n" for r in dev[:5])
    contexts = [header + shots + example(r) for r in test]
    encoded = []
    for context in contexts:
        ids = tokenizer(context).input_ids
        continuations = [tokenizer(context + " " + letter).input_ids[len(ids):] for letter in LETTERS]
        shared = continuations[0][:-1]
        assert all(len(c) == len(shared) + 1 and c[:-1] == shared for c in continuations), \
            "the peer handles letters that differ only in their last token"
        encoded.append((ids + shared, len(ids), continuations))
    choices = []
    start = time.perf_counter()
    with torch.inference_mode():
        for fed, context_len, continuations in encoded:
            # One forward pass per question: the four continuations share all but their last token.
            logprobs = torch.log_softmax(model(torch.tensor([fed])).logits[0].float(), dim=-1)
            scores = [
                sum(float(logprobs[context_len - 1 + j, t]) for j, t in enumerate(c)) for c in continuations
            ]
            choices.append(LETTERS[max(range(4), key=lambda i: (scores[i], -i))])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "questions": len(contexts), "choices": choices}))


if __name__ == "__main__":
    main()
