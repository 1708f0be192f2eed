"""The PyTorch + PEFT side of `swift bench finetune`: the same LoRA/QLoRA
steps on the same model folder and the same token rows (read from swift's
preprocess shards), on CPU, timed the same way (tokens/s is the median over the steps after the first).
Prints one JSON object.

    .venv/bin/python scripts/bench_finetune_peft.py --model DIR --tokens DIR \
        --method lora --steps 20 --batch 8 --rank 8 --alpha 16 --threads 2

Each step takes `--batch` consecutive rows as one `[B, T]` batch, padded on
the right to the longest row with an attention mask (padding labelled -100),
the way a PEFT user batches packed rows.

Differences, kept small on purpose: transformers attends causally over the
whole packed row (swift's block-diagonal mask costs the same), and QLoRA uses
bitsandbytes' CPU backend for NF4 (double quant, f32 compute).
"""

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch


def rows(tokens):
    ids = np.fromfile(f"{tokens}/train.ids", dtype="<u4").astype(np.int64)
    labels = np.fromfile(f"{tokens}/train.labels", dtype=np.uint8)
    offsets = np.fromfile(f"{tokens}/train.rows", dtype="<u8")
    out = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        row = torch.from_numpy(ids[start:end].copy())
        target = row.clone()
        target[torch.from_numpy(labels[start:end] == 0)] = -100
        out.append((row, target))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--method", choices=["lora", "qlora"], required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if args.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    data = rows(args.tokens)

    rates = []
    losses = []
    step_seconds = []
    for step in range(args.steps):
        picked = [data[(step * args.batch + i) % len(data)] for i in range(args.batch)]
        width = max(row.numel() for row, _ in picked)
        ids = torch.zeros((args.batch, width), dtype=torch.long)
        labels = torch.full((args.batch, width), -100, dtype=torch.long)
        mask = torch.zeros((args.batch, width), dtype=torch.long)
        for i, (row, target) in enumerate(picked):
            ids[i, : row.numel()] = row
            labels[i, : row.numel()] = target
            mask[i, : row.numel()] = 1
        started = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        step_seconds.append(seconds)
        losses.append(out.loss.item())
        if step > 0:  # the first step warms up allocators and kernels, as swift's does
            rates.append(int(mask.sum()) / seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "method": args.method,
        "steps": args.steps,
        "batch": args.batch,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "step_seconds": step_seconds,
        "peak_rss_bytes": peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
    }))


if __name__ == "__main__":
    main()
