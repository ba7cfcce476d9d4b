#!/usr/bin/env bash
# End-to-end speed on the GPU host, both engines in one go on the same model folder:
#   1. hip-bench e2e (hip-core, dense and HiP) writes the Qwen2.5-1.5B-shaped folder with seeded
#      random weights (or reuses it) and measures;
#   2. scripts/hf_e2e_bench.py measures transformers + SDPA on the same folder;
#   3. the combined table (and HiP over dense / over transformers) is printed.
#
#   scripts/e2e_bench.sh [extra hip-bench e2e flags, e.g. --hip-config k=256 or --prefix fork]
#
# Environment: HIP_BENCH (the hip-bench binary; default: hip-bench on PATH, then ./hip-bench),
# E2E_DIR (model folder, default /tmp/hip-e2e-qwen2.5-1.5b), E2E_OUT (results, default $OUT or
# /tmp/hip-e2e-out), CONTEXTS (4096,32768,131072), BATCH (1,16), DECODE (64), DECODE_WARMUP (8),
# CHUNK (hip-core prefill chunk, 4096), SKIP_HIP=1 / SKIP_HF=1 (run one side only),
# E2E_TINY=1 (2-layer model, a quick check of the pipeline).
# Writes hip_e2e.jsonl, hf_e2e.jsonl, their logs and e2e_table.md into E2E_OUT.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${HIP_BENCH:-$(command -v hip-bench || echo ./hip-bench)}
out=${E2E_OUT:-${OUT:-/tmp/hip-e2e-out}}
contexts=${CONTEXTS:-4096,32768,131072}
batch=${BATCH:-1,16}
decode=${DECODE:-64}
warm=${DECODE_WARMUP:-8}
tiny=()
dir_default=/tmp/hip-e2e-qwen2.5-1.5b
if [[ "${E2E_TINY:-0}" == 1 ]]; then
    tiny=(--tiny)
    dir_default=/tmp/hip-e2e-qwen2-tiny
fi
dir=${E2E_DIR:-$dir_default}
mkdir -p "$out"
# Fewer fragments when transformers' DynamicCache grows by concatenation at 16 x 128k.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

status=0
if [[ "${SKIP_HIP:-0}" != 1 ]]; then
    echo "== hip-bench e2e ($bin) =="
    "$bin" e2e "${tiny[@]}" --dir "$dir" --contexts "$contexts" --batch "$batch" --decode "$decode" \
        --decode-warmup "$warm" --chunk "${CHUNK:-4096}" --json "$out/hip_e2e.jsonl" "$@" \
        2>&1 | tee "$out/hip_e2e.log" || status=1
fi
if [[ "${SKIP_HF:-0}" != 1 ]]; then
    # The folder of an earlier run (same shapes and seed) is reused; otherwise hip-bench writes it.
    "$bin" e2e "${tiny[@]}" --dir "$dir" --write-only
    echo "== transformers + SDPA =="
    python3 "$here/hf_e2e_bench.py" --dir "$dir" --contexts "$contexts" --batch "$batch" --decode "$decode" \
        --decode-warmup "$warm" --json "$out/hf_e2e.jsonl" 2>&1 | tee "$out/hf_e2e.log" || status=1
fi

echo "== combined =="
python3 - "$out/hip_e2e.jsonl" "$out/hf_e2e.jsonl" <<'EOF' | tee "$out/e2e_table.md"
import json, os, sys
rows = []
for path in sys.argv[1:]:
    if os.path.exists(path):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
key = lambda r: (r["context"], r["batch"], {"transformers": 0}.get(r["engine"], 1), r["method"])
by = {(r["engine"], r["method"], r["context"], r["batch"]): r for r in rows}
print("| engine | method | T | batch | prefill tok/s | decode tok/s | ms/step | KV GB | decode vs dense | decode vs transformers |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=key):
    d = by.get(("hip-core", "dense", r["context"], r["batch"]))
    h = by.get(("transformers", "sdpa", r["context"], r["batch"]))
    vs = lambda o: f"{r['decode_tok_s'] / o['decode_tok_s']:.2f}x" if o else "-"
    print(f"| {r['engine']} | {r['method']} | {r['context']} | {r['batch']} | {r['prefill_tok_s']:.0f} "
          f"| {r['decode_tok_s']:.1f} | {r['decode_ms_per_step']:.2f} | {r['kv_bytes'] / 1e9:.2f} | {vs(d)} | {vs(h)} |")
print("\nprefill: one sequence (batch 1), in chunks of prefill_chunk tokens (see the JSON; = T: one forward);"
      " hip-core: f32 weights, bf16 KV; transformers: bf16. decode: tokens/s over the whole batch.")
EOF
exit $status
