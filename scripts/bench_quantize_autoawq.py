"""The AutoAWQ side of `swift bench quantize`: AutoAWQ 0.2.9's own
`AutoAWQForCausalLM.quantize()` on the same model folder and the same
calibration corpus, on CPU in float32. Prints one JSON line, last.

    .venv/bin/python scripts/bench_quantize_autoawq.py --model DIR --calib FILE.jsonl \
        --samples 8 --seq-len 512 --threads 2 [--group-size 128] [--duo-scaling]

The model is loaded with `AutoAWQForCausalLM.from_pretrained(DIR,
torch_dtype=torch.float32, device_map="cpu")` (timed as `load_seconds`), then
`quantize(tokenizer, quant_config={"w_bit": 4, "q_group_size": G, "zero_point":
True, "version": "GEMM"}, calib_data=..., duo_scaling=..., apply_clip=True,
max_calib_samples=N, max_calib_seq_len=L, n_parallel_calib_samples=None)` is
timed alone as `seconds`. Defaults match swift's quantize stage: 4-bit with zero
point, group 128, clip search on, and plain scaling s = mean|x|^alpha (llm-awq's;
AutoAWQ defaults to duo scaling, `--duo-scaling` turns it on).

Calibration is exactly N blocks of L tokens: the corpus's `text` values, in file
order, trimmed and tokenized one by one as AutoAWQ's `get_calib_dataset` does
(`tokenizer.encode(text.strip())`, no special tokens added for Qwen2), with the
folder's tokenizer.json as swift reads it (`PreTrainedTokenizerFast`:
transformers 5's AutoTokenizer maps model_type qwen2 to `Qwen2Tokenizer`, which
splits the fixture tokenizer's text differently), concatenated and cut into N
blocks of L tokens here, and handed to quantize() as N lists of L token ids (a form
`get_calib_dataset` accepts), with max_calib_samples=N and max_calib_seq_len=L:
it concatenates them and cuts them back into the same N blocks, which all go
through each layer at once (n_parallel_calib_samples=None, AutoAWQ's default).
The script checks that the hidden states the quantizer carries from layer to
layer are [N, L, hidden]. swift
shuffles the texts (seeded) before concatenating; on the benchmark's corpus
only the shapes matter for time.

Patches: none to AutoAWQ's code. CUDA is hidden (CUDA_VISIBLE_DEVICES="" before
torch is imported), so AutoAWQ's own `get_best_device()` returns "cpu" and
`quantize()` keeps every layer on the CPU (the script asserts both); there is
no MPS or XPU on the machines this runs on. The model is loaded in float32
instead of AutoAWQ's default float16 (`torch_dtype` is a from_pretrained
argument), so the scale and clip searches run in f32 like swift's.

What the timed region includes: everything `quantize()` does, that is building
the quantizer (the calibration blocks, the embedding forward that captures
layer 0's inputs), then per layer: the forward that captures the linears'
inputs, the scale search and `apply_scale`, the clip search and `apply_clip`,
and `_apply_quant`, which casts each linear to fp16 (on CPU, as AutoAWQ does
on any device), pseudo-quantizes it and packs it into a `WQLinear_GEMM`
(qweight/qzeros int32, scales fp16) in place of the nn.Linear. Packing cannot
be left out (export_compatible=True would also skip the quantization itself);
`apply_quant_seconds` is the part spent in `_apply_quant` (timed by a subclass
passed as `quantizer_cls`, which only wraps it). Nothing is saved to disk.
swift's figure includes more: loading, writing the folder and the held-out
perplexities.

The JSON line: seconds (quantize() only), load_seconds, apply_quant_seconds,
peak_rss_bytes (ru_maxrss of the whole process), load_peak_rss_bytes and
import_peak_rss_bytes (ru_maxrss after loading, and after the imports alone:
CUDA builds of torch map most of that floor), calib_shape [N, L], layers,
group_size, duo_scaling, torch_threads, autoawq, torch.
"""

import argparse
import json
import os
import resource
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402


def calibration_blocks(tokenizer, path, samples, seq_len):
    """N blocks of L token ids from the corpus's texts, in file order."""
    need = samples * seq_len
    stream = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"].strip()
            if text:
                stream.extend(tokenizer.encode(text))
            if len(stream) >= need:
                break
    if len(stream) < need:
        raise SystemExit(f"{path}: {len(stream)} tokens, fewer than {samples} blocks of {seq_len}")
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(samples)]


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--duo-scaling", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import importlib.metadata

    from awq import AutoAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.utils import get_best_device
    from transformers import PreTrainedTokenizerFast

    assert not torch.cuda.is_available() and get_best_device() == "cpu", get_best_device()
    import_peak = peak_rss()  # torch, transformers and awq imported: the floor under both figures below

    apply_quant = [0.0]

    class TimedQuantizer(AwqQuantizer):
        """AutoAWQ's quantizer, with the time spent in _apply_quant (fp16 cast, quantize, pack) counted."""

        def _apply_quant(self, module, named_linears):
            started = time.perf_counter()
            super()._apply_quant(module, named_linears)
            apply_quant[0] += time.perf_counter() - started

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    blocks = calibration_blocks(tokenizer, args.calib, args.samples, args.seq_len)

    started = time.perf_counter()
    model = AutoAWQForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, device_map="cpu",
                                               trust_remote_code=False)
    load_seconds = time.perf_counter() - started
    load_peak = peak_rss()
    assert next(model.model.parameters()).dtype == torch.float32

    quant_config = {"w_bit": 4, "q_group_size": args.group_size, "zero_point": True, "version": "GEMM"}
    started = time.perf_counter()
    model.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=blocks,
        duo_scaling=args.duo_scaling,
        apply_clip=True,
        max_calib_samples=args.samples,
        max_calib_seq_len=args.seq_len,
        n_parallel_calib_samples=None,
        quantizer_cls=TimedQuantizer,
    )
    seconds = time.perf_counter() - started

    assert model.quantizer.duo_scaling == args.duo_scaling and model.quantizer.apply_clip
    # the last layer's output: one row per calibration block, seq_len positions each
    shape = tuple(model.quantizer.inps.shape)
    assert shape[:2] == (args.samples, args.seq_len), shape
    layers = model.quantizer.modules
    assert all(str(p.device) == "cpu" for layer in layers for p in layer.parameters())
    packed = sum(type(m).__name__ == "WQLinear_GEMM" for layer in layers for m in layer.modules())
    assert packed == 7 * len(layers), packed
    print(json.dumps({
        "seconds": seconds,
        "load_seconds": load_seconds,
        "apply_quant_seconds": apply_quant[0],
        "peak_rss_bytes": peak_rss(),
        "load_peak_rss_bytes": load_peak,
        "import_peak_rss_bytes": import_peak,
        "calib_shape": list(shape[:2]),
        "layers": len(layers),
        "group_size": args.group_size,
        "duo_scaling": args.duo_scaling,
        "torch_threads": torch.get_num_threads(),
        "autoawq": importlib.metadata.version("autoawq"),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
