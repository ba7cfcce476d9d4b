# hip: the two commands every fresh machine runs are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: test assets fmt clippy unit demo bench bench-kernels doc

test: assets fmt clippy unit

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

demo:
	@echo "make demo: not yet available: the SDK and the RAG example land with the hip-sdk issue."
	@echo "Meanwhile: cargo test -p hip-kernels  /  cargo bench -p hip-kernels"

bench: bench-kernels

bench-kernels:
	$(CARGO) bench -p hip-kernels --bench attention
