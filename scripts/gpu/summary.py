"""Reads what scripts/gpu-check.sh wrote into DIR (selftest.jsonl, bench.jsonl,
peers.jsonl) and prints the short table it ends with; also writes
DIR/summary.md. Missing files or parts are listed as missing, not skipped."""

import json
import sys
from pathlib import Path


def lines(path):
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def main():
    out = Path(sys.argv[1])
    rows = []
    checks = lines(out / "selftest.jsonl")
    failed = [c for c in checks if not c["passed"]]
    rows.append(("selftest", f"{len(checks) - len(failed)} passed, {len(failed)} failed" if checks else "missing"))
    for c in failed:
        rows.append(("  failed", f"{c['name']}: rel {c['rel']:.2e} > {c['tolerance']:.1e} {c.get('error') or ''}"))
    ours = lines(out / "bench.jsonl")
    peers = lines(out / "peers.jsonl")
    for e in ours + peers:
        if "error" in e:
            rows.append((f"{e['part']} error", ("peer: " if e.get("peer") else "") + e["error"][:200]))
    copy = {e["kernel"]: e["tb_per_s"] for e in ours + peers if e.get("part") == "kernels" and "tb_per_s" in e}
    torch_copy = copy.get("device copy (torch)")
    for name, tbs in copy.items():
        share = f" ({tbs / torch_copy:.0%} of torch's copy)" if torch_copy else ""
        rows.append(("bandwidth", f"{name}: {tbs:.2f} TB/s{share}"))
    for e in [e for e in ours if e.get("part") == "finetune" and "tokens_per_s" in e]:
        peer = next((p for p in peers if p.get("part") == "finetune" and p.get("model") == e["model"] and "tokens_per_s" in p), None)
        versus = f" vs PEFT LoRA {peer['tokens_per_s']:.0f} tok/s, {peer['peak_gib']:.1f} GiB: {e['tokens_per_s'] / peer['tokens_per_s']:.2f}×" if peer else ""
        rows.append(("finetune", f"{e['model']} {e['method']} {e['batch']}: {e['tokens_per_s']:.0f} tok/s, peak {e['peak_gib']:.1f} GiB{versus}"))
    torch_layer = {p["batch"]: p["layer_us"] for p in peers if p.get("part") == "awq" and "layer_us" in p}
    for e in [e for e in ours if e.get("part") == "awq" and "layer_us" in e]:
        versus = f", torch bf16 {torch_layer[e['batch']]:.0f} µs" if e["batch"] in torch_layer else ""
        rows.append(("awq 7B layer", f"{e['kernel']} m={e['batch']}: {e['layer_us']:.0f} µs, candle bf16 {e['cublas_bf16_layer_us']:.0f} µs ({e['speedup']:.2f}×){versus}"))
    for e in [e for e in ours if e.get("part") == "eval" and "questions_per_s" in e]:
        peer = next((p for p in peers if p.get("part") == "eval" and p.get("model") == e["model"] and "questions_per_s" in p), None)
        versus = f" vs transformers naive {peer['questions_per_s']:.1f}: {e['questions_per_s'] / peer['questions_per_s']:.2f}×" if peer else ""
        rows.append(("eval", f"{e['model']}: {e['questions_per_s']:.1f} questions/s{versus}"))
    width = max(len(r[0]) for r in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
