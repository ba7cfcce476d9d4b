#!/usr/bin/env python3
"""transformers + SDPA peer of `hip-bench e2e` (run on the GPU host, same run, same model folder).

Loads the folder `hip-bench e2e` writes (Qwen2.5-1.5B shapes, seeded random bf16 weights) with
AutoModelForCausalLM in bfloat16, attn_implementation="sdpa", on cuda, and measures, per context T:

* prefill (batch 1): the T prompt tokens, by default in one forward (logits of the last position
  only); if that runs out of memory, again in chunks of --fallback-chunk tokens (--chunk N forces
  chunks). The row says which in "prefill_chunk". Timed up to the greedy first token.
* decode (each --batch): the prefilled KV cache is copied into a DynamicCache of B sequences
  (torch repeat: B independent copies, as hip-bench's default "copy"), then --decode-warmup untimed
  and --decode timed greedy steps, one forward of B single tokens per step, the tokens read back to
  the host each step (as hip-bench does). DynamicCache appends by concatenation, so each step also
  copies the cache: that is how transformers decodes by default (generate() uses it).

Prints a markdown table and writes JSON lines in the schema of `hip-bench e2e --json`.

usage: python3 scripts/hf_e2e_bench.py --dir /tmp/hip-e2e-qwen2.5-1.5b [--contexts 4096,32768,131072]
       [--batch 1,16] [--decode 64] [--decode-warmup 8] [--chunk 0] [--fallback-chunk 8192] [--json out.jsonl]
"""
import argparse
import gc
import inspect
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

HEADER = "| engine | method | T | batch | prefill tok/s | decode tok/s | ms/step | KV GB |\n|---|---|---|---|---|---|---|---|"


def load(path):
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 renamed torch_dtype to dtype; an unknown keyword would be silently ignored.
    kw = {"dtype": torch.bfloat16} if major >= 5 else {"torch_dtype": torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw)
    model.to("cuda").eval()
    dtype = next(model.parameters()).dtype
    if dtype != torch.bfloat16:
        sys.exit(f"hf_e2e_bench: the model loaded as {dtype}, not bfloat16")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        sys.exit(f"hf_e2e_bench: attention implementation is {impl!r}, not 'sdpa'")
    params = inspect.signature(model.forward).parameters
    keep = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep" if "num_logits_to_keep" in params else None
    return model, keep


def layer_kv(cache):
    """The (keys, values) tensors of every layer, [B, kv_heads, T, head_dim]."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_bytes(cache):
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layer_kv(cache))


def replicate(template, b, config):
    """A new DynamicCache holding b independent copies of the batch-1 cache `template`."""
    try:
        cache = DynamicCache(config=config)
    except TypeError:
        cache = DynamicCache()
    for i, (k, v) in enumerate(layer_kv(template)):
        cache.update(k.repeat(b, 1, 1, 1), v.repeat(b, 1, 1, 1), i)
    return cache


@torch.inference_mode()
def prefill(model, keep, ids, chunk):
    """Prefill ids [1, T] in chunks of `chunk` (0: one forward). Returns (cache, first token, seconds)."""
    kw = {keep: 1} if keep else {}
    t = ids.shape[1]
    step = t if chunk <= 0 else chunk
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    past = None
    for s in range(0, t, step):
        out = model(input_ids=ids[:, s:s + step], past_key_values=past, use_cache=True, **kw)
        past = out.past_key_values
    first = out.logits[:, -1].argmax(-1)
    first_host = int(first.item())
    secs = time.perf_counter() - t0
    del out
    return past, first_host, secs


@torch.inference_mode()
def decode(model, template, first, b, warmup, steps, vocab):
    """b sequences from `template` decode together; returns (seconds of the timed steps, KV bytes)."""
    cache = replicate(template, b, model.config)
    tok = ((torch.arange(b, device="cuda") + first) % vocab).view(b, 1)

    def one():
        nonlocal tok
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1).view(b, 1)
        tok.view(-1).tolist()  # the host reads the tokens each step, like a serving loop

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    size = kv_bytes(cache)
    del cache
    return secs, size


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/hip-e2e-qwen2.5-1.5b")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--decode-warmup", type=int, default=8)
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk; 0 = the whole prompt in one forward")
    p.add_argument("--fallback-chunk", type=int, default=8192, help="prefill chunk after an out-of-memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()
    contexts = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batch.split(",")]
    if min(contexts + batches) < 1 or a.decode < 1 or a.decode_warmup < 0 or a.fallback_chunk < 1:
        sys.exit("hf_e2e_bench: contexts, batches, --decode and --fallback-chunk must be at least 1")
    out = open(a.json, "w") if a.json else None

    t0 = time.perf_counter()
    model, keep = load(a.dir)
    vocab = model.config.vocab_size
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, sdpa, bf16; "
          f"loaded in {time.perf_counter() - t0:.1f} s; logits kwarg: {keep}", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(a.seed)

    # Warm-up (cuBLAS handles, SDPA kernel choice): a 2k prefill and two decode steps, untimed.
    t0 = time.perf_counter()
    ids = torch.randint(0, vocab, (1, 2048), generator=gen).cuda()
    past, first, _ = prefill(model, keep, ids, 0)
    decode(model, past, first, 2, 0, 2, vocab)
    del past
    print(f"warm-up: {time.perf_counter() - t0:.1f} s\n", flush=True)

    print(HEADER, flush=True)
    failures = []
    for t in contexts:
        ids = torch.randint(0, vocab, (1, t), generator=gen).cuda()
        chunk = a.chunk
        past = None
        try:
            past, first, secs = prefill(model, keep, ids, chunk)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, once the exception (and the frames it holds) is gone
        if past is None:
            gc.collect()
            torch.cuda.empty_cache()
            if chunk > 0:
                failures.append(f"T={t}: prefill in chunks of {chunk} ran out of memory")
                print(failures[-1], file=sys.stderr)
                continue
            print(f"(T={t}: one-forward prefill ran out of memory; chunks of {a.fallback_chunk})", file=sys.stderr)
            chunk = a.fallback_chunk
            past, first, secs = prefill(model, keep, ids, chunk)
        used_chunk = t if chunk <= 0 else min(chunk, t)
        template_bytes = kv_bytes(past)
        for b in batches:
            res = None
            try:
                res = decode(model, past, first, b, a.decode_warmup, a.decode, vocab)
            except torch.cuda.OutOfMemoryError as e:
                failures.append(f"T={t} batch {b}: decode ran out of memory ({str(e).splitlines()[0][:100]})")
                print(failures[-1], file=sys.stderr)
            if res is None:
                gc.collect()
                torch.cuda.empty_cache()
                continue
            dsecs, size = res
            row = {
                "bench": "e2e", "engine": "transformers", "method": "sdpa", "context": t, "batch": b,
                "prefill_tok_s": t / secs, "prefill_s": secs, "prefill_batch": 1, "prefill_chunk": used_chunk,
                "decode_tok_s": b * a.decode / dsecs, "decode_ms_per_step": dsecs * 1e3 / a.decode,
                "decode_steps": a.decode, "kv_bytes": size, "kv_bytes_in_use": size + template_bytes,
                "prefix": "copy", "weights_dtype": "bf16", "kv_dtype": "bf16", "cache": "DynamicCache",
                "transformers": transformers.__version__, "torch": torch.__version__,
            }
            print(f"| transformers | sdpa | {t} | {b} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} "
                  f"| {row['decode_ms_per_step']:.2f} | {size / 1e9:.2f} |", flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            gc.collect()
            torch.cuda.empty_cache()
        del past
        gc.collect()
        torch.cuda.empty_cache()
    if failures:
        sys.exit("hf_e2e_bench: " + "; ".join(failures))


if __name__ == "__main__":
    main()
