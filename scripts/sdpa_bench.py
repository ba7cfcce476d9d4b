#!/usr/bin/env python3
"""PyTorch SDPA baseline for `hip-bench attn` (run on the GPU host, same run as hip-bench).

Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads (GQA), head dim 128, bf16, random data.
Prefill: a chunk of queries against all T keys (no mask: the causal triangle of the chunk is a
small share of the work at large T); decode: one query per sequence, batch 1 and 16. Backends:
FlashAttention and cuDNN; times are CUDA-event medians (triton.testing.do_bench).

usage: python3 scripts/sdpa_bench.py [--t 32768,131072,524288,1048576] [--chunk 32768] [--batch 1,16] [--json out.jsonl]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

HQ, HKV, D = 32, 8, 128


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", default="32768,131072,524288,1048576")
    p.add_argument("--chunk", type=int, default=32768)
    p.add_argument("--batch", default="1,16")
    p.add_argument("--json")
    a = p.parse_args()
    ts = [int(x) for x in a.t.split(",")]
    batches = [int(x) for x in a.batch.split(",")]
    out = open(a.json, "w") if a.json else None
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    torch.manual_seed(0)
    print("| op | T | batch | " + " | ".join(f"{b} ms" for b in backends) + " |")
    print("|---|---|---|" + "---|" * len(backends))
    for t in ts:
        bmax = max(batches)
        # [B, H, T, D] views of token-major storage, as a serving engine would hold them.
        k = torch.randn(bmax, t, HKV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(bmax, t, HKV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        chunk = min(a.chunk, t)
        cases = [("prefill", 1, torch.randn(1, chunk, HQ, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2))]
        cases += [("decode", b, torch.randn(b, 1, HQ, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)) for b in batches]
        for op, b, q in cases:
            kb, vb = k[:b], v[:b]
            row = {"op": op, "t": t, "batch": b, "chunk": chunk if op == "prefill" else 1}
            for name, be in backends.items():
                try:
                    with sdpa_kernel(be):
                        fn = lambda: F.scaled_dot_product_attention(q, kb, vb, enable_gqa=True)
                        row[f"{name}_ms"] = do_bench(fn, warmup=50, rep=300, return_mode="median")
                except Exception as e:  # a backend that refuses the shape
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = str(e).splitlines()[0][:120]
            cells = " | ".join("n/a" if row[f"{n}_ms"] is None else f"{row[f'{n}_ms']:.3f}" for n in backends)
            print(f"| {op} | {t} | {b} | {cells} |", flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
        del k, v, cases
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
