"""The peers of `swift bench gpu`, run on the same card in the same call by
scripts/gpu-check.sh: PyTorch, transformers and PEFT as people use them, on
random-initialised models of the same shapes (Qwen2.5-0.5B and -7B built from
their configs on the GPU: nothing to download).

Parts (--only): copy (device-to-device bandwidth), matmul (a 7B decoder
layer's linears in bf16 at decode batch sizes, the cuBLAS baseline of the AWQ
kernels), lora (transformers + PEFT LoRA r64 on all linear layers: bf16 base,
f32 adapters, AdamW, sdpa attention, no activation checkpointing, loss on every
token; tokens/s and peak memory), eval (5-shot MMLU-length scoring, one forward
per question as lm-eval's HF backend does). One JSON line per measurement on
stdout and in --out.
"""

import argparse
import json
import time

import torch

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
LAYER_7B = [("q_proj", 3584, 3584), ("k_proj", 3584, 512), ("v_proj", 3584, 512), ("o_proj", 3584, 3584),
            ("gate_proj", 3584, 18944), ("up_proj", 3584, 18944), ("down_proj", 18944, 3584)]


def emit(out, part, **fields):
    line = json.dumps({"part": part, "peer": True, **fields})
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def timed(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy(out):
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), 20)
    emit(out, "kernels", kernel="device copy (torch)", tb_per_s=2 * 2 * x.numel() / seconds / 1e12)


def matmul(out):
    copies = 4
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _, k, n in LAYER_7B]
               for _ in range(copies)]
    for m in (1, 4, 8, 16):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k, _ in LAYER_7B]
        turn = [0]

        def layer():
            turn[0] = (turn[0] + 1) % copies
            for x, w in zip(xs, weights[turn[0]]):
                torch.nn.functional.linear(x, w)

        emit(out, "awq", kernel="torch bf16 linear (cuBLAS)", batch=m, layer_us=timed(layer, 50) * 1e6)


def model(shape, dtype=torch.bfloat16):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**SHAPES[shape], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    # Built straight in bf16 on the card (a 7B model in f32 first would need 30 GB).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            return Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def lora(out, shape, batch, steps):
    from peft import LoraConfig, get_peft_model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = model(shape)
    peft_model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, 1024), device="cuda")

    def step():
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps, warmup=1)
    emit(out, "finetune", model=shape, method="lora", batch=f"{batch} × 1024", rank=64,
         tokens_per_s=batch * 1024 / seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
         reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    del peft_model, base, optimizer
    torch.cuda.empty_cache()


def naive_eval(out, shape, questions):
    m = model(shape).eval()
    vocab = SHAPES[shape]["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(0)
    prefix = torch.randint(0, vocab, (550,), device="cuda", generator=g)
    prompts = [torch.cat([prefix, torch.randint(0, vocab, (60,), device="cuda", generator=g)]) for _ in range(questions)]
    letters = torch.tensor([32, 33, 34, 35], device="cuda")

    def score_all():
        with torch.no_grad():
            for p in prompts:
                logits = m(input_ids=p[None]).logits[0, -1].float()
                torch.log_softmax(logits, -1)[letters]

    seconds = timed(score_all, 1, warmup=1)
    emit(out, "eval", model=shape, method="transformers, one forward per question", questions=questions,
         prompt_tokens=611, questions_per_s=questions / seconds)
    del m
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", choices=["copy", "matmul", "lora", "eval"])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    emit(args.out, "device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    parts = {
        "copy": lambda: copy(args.out),
        "matmul": lambda: matmul(args.out),
        "lora": lambda: (lora(args.out, "qwen2.5-0.5b", 8, args.steps), lora(args.out, "qwen2.5-7b", 4, args.steps)),
        "eval": lambda: (naive_eval(args.out, "qwen2.5-0.5b", 32), naive_eval(args.out, "qwen2.5-7b", 32)),
    }
    for name, run in parts.items():
        if args.only in (None, name):
            try:
                run()
            except Exception as e:  # one failing part must not hide the others
                emit(args.out, name, error=repr(e))


if __name__ == "__main__":
    main()
