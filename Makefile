# hip: the two commands every fresh machine runs are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: test assets fmt clippy unit demo bench bench-kernels doc

test: assets fmt clippy unit doc

# Models and texts the tests need (SmolLM2-135M GGUF, Moby-Dick, State of the Union), cached in
# $${HIP_ASSETS:-~/.cache/hip}; does nothing when they are already there.
assets:
	bash scripts/fetch-assets.sh smollm2 texts

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

# The RAG example on the CPU: SmolLM2-135M-Instruct answers a question about the 2020 State of the
# Union address (7,438 tokens), streaming the answer. The first run prefills the address and saves
# the session under $${HIP_ASSETS:-~/.cache/hip}/sessions/; later runs load it and answer at once.
DEMO_QUESTION ?= What is this speech about?

demo: assets
	$(CARGO) run --release -p hip-examples --example rag -- "$(DEMO_QUESTION)"

bench: bench-kernels

bench-kernels:
	$(CARGO) bench -p hip-kernels --bench attention

# ---- CUDA builds (docs/gpu.md) ---------------------------------------------------------------------
# `make cuda`: the release binaries with `--features cuda` (CUDA 13.0 from pinned PyPI wheels,
# scripts/cuda-env.sh), stripped and packed into $(GPU_BIN)/cuda-bins.tar.xz to carry to the GPU host
# (run tool: carry ["gpu-bin"]; there: `. scripts/gpu-unpack.sh`, then run them by name). Each binary
# holds candle's CUDA kernels (about 33 MiB of GGUF matmul SASS and 13 MiB of PTX), so unpacked they
# are 35-55 MiB each; one solid xz archive with a 64 MiB window stores that once. They build in
# their own target dir, so the CPU target stays warm and the two builds never wait on each other.
# `make ci-cuda`: what CI checks of that without a GPU: hip-cuda-check builds, starts against the
# link-time stubs and fails cleanly with "no CUDA device" (exit 2, one line).
.PHONY: cuda ci ci-cuda
CUDA_TARGET_DIR ?= $(CURDIR)/target-cuda
GPU_BIN ?= gpu-bin
CUDA_BINS ?= hip-cuda-check hip-eval hip-bench-model hip-bench

ci: test ci-cuda

cuda: SHELL := /bin/bash
cuda:
	@set -euo pipefail; . scripts/cuda-env.sh; export CARGO_TARGET_DIR="$(CUDA_TARGET_DIR)"; \
	$(CARGO) build --release --features cuda -p hip-e2e $(addprefix --bin ,$(CUDA_BINS)); \
	$(CARGO) test --release --features cuda -p hip-kernels --no-run --message-format=json-render-diagnostics \
	    >"$$CARGO_TARGET_DIR/hip-kernels-tests.json"; \
	stage="$$CARGO_TARGET_DIR/gpu-bin-stage"; rm -rf "$$stage"; mkdir -p "$$stage"; \
	for b in $(CUDA_BINS); do strip -o "$$stage/$$b" "$$CARGO_TARGET_DIR/release/$$b"; done; \
	python3 -c 'import json, sys; [print(m["target"]["name"], m["executable"]) for m in map(json.loads, open(sys.argv[1])) if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable")]' \
	    "$$CARGO_TARGET_DIR/hip-kernels-tests.json" \
	| while read -r name exe; do strip -o "$$stage/hip-kernels-test-$$name" "$$exe"; done; \
	echo "make cuda: stripped binaries:"; \
	ls -l "$$stage" | awk 'NR > 1 { printf "  %8.1f MiB  %s\n", $$5 / 1048576, $$9 }'; \
	rm -rf "$(GPU_BIN)"; mkdir -p "$(GPU_BIN)"; \
	tar -C "$$stage" -cf - . | xz --lzma2=preset=1,dict=64MiB -T1 >"$(GPU_BIN)/cuda-bins.tar.xz"; \
	echo "make cuda: $(GPU_BIN)/cuda-bins.tar.xz: $$(du -m "$$stage" | cut -f1) MiB packed into" \
	    "$$(du -m "$(GPU_BIN)/cuda-bins.tar.xz" | cut -f1) MiB (device carry limit: 64 MiB, whole tree)"

ci-cuda: SHELL := /bin/bash
ci-cuda:
	@set -euo pipefail; . scripts/cuda-env.sh; export CARGO_TARGET_DIR="$(CUDA_TARGET_DIR)"; \
	$(CARGO) build --release --features cuda -p hip-e2e --bin hip-cuda-check; \
	set +e; out=$$(LD_LIBRARY_PATH="$$HIP_CUDA_STUB_LD_PATH" "$$CARGO_TARGET_DIR/release/hip-cuda-check" 2>&1); \
	rc=$$?; set -e; printf '%s\n' "$$out"; \
	if [[ $$rc -eq 2 && "$$out" == "hip-cuda-check: no CUDA device: "* && "$$out" != *$$'\n'* ]]; then \
	    echo "ci-cuda: ok: hip-cuda-check exits 2 with one 'no CUDA device' line when there is no GPU"; \
	else echo "ci-cuda: FAILED: expected exit 2 and one 'hip-cuda-check: no CUDA device: ...' line, got exit $$rc"; exit 1; fi

# ---- Long-context quality (docs/quality.md) -------------------------------------------------------
# SmolLM2 passkey, needle and perplexity, dense vs HiP (paper config) vs sink + window; results in
# eval-out/ (JSON, markdown, needle heat map PNG). Slow on a CPU: about a minute per 2k-token prompt.
.PHONY: eval
EVAL_LENGTHS ?= 1024,2048
eval: assets
	$(CARGO) build --release -p hip-e2e --bin hip-eval
	target/release/hip-eval passkey --lengths $(EVAL_LENGTHS) --out eval-out
	target/release/hip-eval needle --lengths $(EVAL_LENGTHS) --out eval-out
	target/release/hip-eval ppl --lengths $(EVAL_LENGTHS) --score-last 256 --out eval-out
