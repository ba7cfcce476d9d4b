#!/usr/bin/env bash
# The CUDA 13.0 build environment for `--features cuda` on a machine without a GPU or a CUDA toolkit.
#
#   bash scripts/cuda-env.sh          install (or check) the toolchain, print where it is
#   . scripts/cuda-env.sh             the same, then export the build environment into this shell
#
# What it installs, in ${HIP_CUDA_HOME:-$HOME/.cache/hip/cuda}/13.0 (docs/gpu.md §1, §3):
#   - the pinned CUDA 13.0 compiler wheels from PyPI (nvcc, cicc/libnvvm, crt and runtime headers,
#     libcudart.so.13, cccl), each checked against its pinned sha256 before it is installed. The pin
#     matters: a newer nvcc (13.5) emits PTX ISA 9.5, which the H200 host's 580 driver cannot load.
#   - link-time stubs of libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and
#     libnvrtc.so.13 (every extern function of cudarc's sys modules, with the real SONAME), compiled
#     with gcc. The binaries record only the SONAMEs; on the GPU host the real libraries are found by
#     the system loader, so the stubs never travel. The libcuda stub answers cuInit with
#     CUDA_ERROR_NO_DEVICE, so a CUDA binary run here against the stubs fails cleanly.
#
# What sourcing exports: CUDA_HOME, CUDA_PATH, CUDA_ROOT (the wheel tree nvidia/cu13), NVCC, PATH
# (nvcc first), CUDA_COMPUTE_CAP (default 90: the H200; candle-kernels turns it into sm_90a),
# CUDARC_CUDA_VERSION=13000, LIBRARY_PATH (stubs and libcudart for the linker), CARGO_TARGET_DIR
# (default <repo>/target-cuda: CUDA builds never share the CPU target dir or its lock), and
# HIP_CUDA_STUB_LD_PATH: the LD_LIBRARY_PATH under which a CUDA binary can start on this machine
# (stubs + libcudart). It does not set LD_LIBRARY_PATH: the stubs must never shadow a real driver.
#
# Idempotent: a second run checks a stamp (pins + cudarc version) and does nothing. Needs python3 with
# pip, gcc, coreutils, and the cargo registry sources of cudarc (it runs `cargo fetch` if they are
# missing). Failures name the package and the step: "cuda-env: FAILED [package P] [step S]: ...".

# ---- pins -----------------------------------------------------------------------------------------
# name==version  wheel file  sha256 (the manylinux x86_64 wheels; all 13.0.x, see above)
_hip_cuda_pins() {
    cat <<'EOF'
nvidia-cuda-nvcc==13.0.88 nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-runtime==13.0.96 nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
EOF
}
# stub file (SONAME)  cudarc sys module it mirrors
_hip_cuda_stubs() {
    cat <<'EOF'
libcuda.so.1 driver
libcublas.so.13 cublas
libcublasLt.so.13 cublaslt
libcurand.so.10 curand
libnvrtc.so.13 nvrtc
EOF
}

# ---- install (runs in a subshell: safe to source) -------------------------------------------------
_hip_cuda_install() (
    set -euo pipefail
    export LC_ALL=C
    log() { printf 'cuda-env: %s\n' "$*" >&2; }
    fail() {
        printf 'cuda-env: FAILED [package %s] [step %s]: %s\n' "$1" "$2" "$3" >&2
        exit 1
    }
    local home=$1 repo=$2 d=$1/13.0 r spec file sha tmp got so mod src cudarc_ver cudarc_src stamp_want

    [[ "$(uname -m)" == x86_64 ]] || fail - platform "the pinned wheels are x86_64; this is $(uname -m)"
    command -v python3 >/dev/null || fail - setup "python3 is needed (pip installs the CUDA wheels)"
    command -v gcc >/dev/null || fail - setup "gcc is needed (it compiles the link-time stubs)"
    mkdir -p "$home" || fail - setup "cannot create $home"

    cudarc_ver=$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' "$repo/Cargo.lock")
    [[ -n "$cudarc_ver" ]] || fail cudarc lockfile "no cudarc in $repo/Cargo.lock"
    stamp_want="$(_hip_cuda_pins; _hip_cuda_stubs; echo "cudarc $cudarc_ver stub-v1")"
    if [[ -x "$d/nvidia/cu13/bin/nvcc" && -f "$d/.stamp" && "$(cat "$d/.stamp")" == "$stamp_want" ]]; then
        return 0
    fi

    # 1. download and verify the wheels, then install them into a fresh tree
    tmp=$(mktemp -d "$home/.tmp.XXXXXX") || fail - setup "cannot create a temporary folder in $home"
    trap 'rm -rf -- "$tmp"' EXIT
    mkdir -p "$tmp/whl"
    while read -r spec file sha; do
        log "pip download $spec"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 --python-version 3 \
            --implementation py --abi none -d "$tmp/whl" "$spec" >&2 \
            || fail "$spec" download "pip download failed"
        [[ -f "$tmp/whl/$file" ]] || fail "$spec" download "pip did not produce $file"
        got=$(sha256sum "$tmp/whl/$file" | cut -d' ' -f1) || fail "$spec" checksum "cannot hash $file"
        [[ "$got" == "$sha" ]] || fail "$spec" checksum "$file: sha256 $got, expected $sha"
    done < <(_hip_cuda_pins)
    log "pip install the 5 wheels into $d"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile \
        --target "$tmp/tree" "$tmp"/whl/*.whl >&2 \
        || fail "$(_hip_cuda_pins | awk '{printf "%s ", $1}')" install "pip install --target failed"
    r=$tmp/tree/nvidia/cu13
    [[ -x "$r/bin/nvcc" ]] || fail nvidia-cuda-nvcc==13.0.88 install "no executable nvidia/cu13/bin/nvcc"
    [[ -f "$r/lib/libcudart.so.13" ]] || fail nvidia-cuda-runtime==13.0.96 install "no lib/libcudart.so.13"
    "$r/bin/nvcc" --version | grep -q 'release 13\.0' \
        || fail nvidia-cuda-nvcc==13.0.88 verify "nvcc --version is not release 13.0"

    # 2. link-time stubs, from cudarc's extern declarations
    cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_ver"/src 2>/dev/null | head -n1) || true
    if [[ -z "$cudarc_src" ]]; then
        log "cargo fetch (for the cudarc-$cudarc_ver sources)"
        (cd "$repo" && cargo fetch --quiet) >&2 || fail "cudarc-$cudarc_ver" fetch "cargo fetch failed"
        cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_ver"/src | head -n1) \
            || fail "cudarc-$cudarc_ver" fetch "no sources under ${CARGO_HOME:-$HOME/.cargo}/registry/src"
    fi
    mkdir -p "$tmp/tree/stubs" "$tmp/stubsrc" "$r/lib64"
    while read -r so mod; do
        src=$tmp/stubsrc/$so.c
        [[ -f "$cudarc_src/$mod/sys/mod.rs" ]] || fail "$so" stubs "missing $cudarc_src/$mod/sys/mod.rs"
        {
            printf '/* link-time stub of %s, generated by scripts/cuda-env.sh */\n' "$so"
            grep -ohP '^\s+fn \K\w+(?=\()' "$cudarc_src/$mod/sys/mod.rs" | sort -u \
                | grep -vxE 'cuInit|cuGetErrorString|cuGetErrorName' \
                | awk '{print "int " $1 "(void) { return 999; }"}'
            if [[ $mod == driver ]]; then
                # CUDA_ERROR_NO_DEVICE, with a message that says where it comes from.
                cat <<'EOF'
int cuInit(unsigned int flags) { (void)flags; return 100; }
int cuGetErrorString(int e, const char **s) {
    *s = e == 100 ? "no CUDA-capable device (stub libcuda.so.1 of scripts/cuda-env.sh: no NVIDIA driver here)"
                  : "unknown error (stub libcuda.so.1 of scripts/cuda-env.sh: no NVIDIA driver here)";
    return 0;
}
int cuGetErrorName(int e, const char **s) {
    *s = e == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN";
    return 0;
}
EOF
            fi
        } >"$src" || fail "$so" stubs "cannot write $src"
        [[ $(grep -c '^int ' "$src") -gt 3 ]] || fail "$so" stubs "no functions found in $mod/sys/mod.rs"
        gcc -shared -fPIC -Wl,-soname,"$so" -o "$tmp/tree/stubs/$so" "$src" || fail "$so" stubs "gcc failed"
        # the linker looks for lib<name>.so: point it at the stub
        ln -sf "../../../stubs/$so" "$r/lib64/${so%%.so*}.so" || fail "$so" stubs "cannot link lib64"
    done < <(_hip_cuda_stubs)
    # -lcudart (candle-kernels) links the real runtime from the wheel
    ln -sf ../lib/libcudart.so.13 "$r/lib64/libcudart.so" || fail nvidia-cuda-runtime==13.0.96 stubs "lib64 link"

    # 3. move into place (the old tree, if any, goes away only after the new one is complete)
    printf '%s\n' "$stamp_want" >"$tmp/tree/.stamp"
    rm -rf -- "$d.old"
    if [[ -e "$d" ]]; then mv -- "$d" "$d.old" || fail - install "cannot move the old $d aside"; fi
    mv -- "$tmp/tree" "$d" || fail - install "cannot move the new tree to $d"
    rm -rf -- "$d.old"
    log "installed CUDA 13.0 (nvcc $("$d/nvidia/cu13/bin/nvcc" --version | grep -o 'V[0-9][0-9.]*')) in $d"
)

_hip_cuda_main() {
    local repo home r
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    home=${HIP_CUDA_HOME:-$HOME/.cache/hip/cuda}
    _hip_cuda_install "$home" "$repo" || return 1
    r=$home/13.0/nvidia/cu13
    HIP_CUDA_ENV_ROOT=$r
    HIP_CUDA_ENV_STUB_LD_PATH=$home/13.0/stubs:$r/lib
    HIP_CUDA_ENV_TARGET=${HIP_CUDA_TARGET_DIR:-$repo/target-cuda}
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # sourced: export the environment
    if _hip_cuda_main; then
        export CUDA_HOME=$HIP_CUDA_ENV_ROOT CUDA_PATH=$HIP_CUDA_ENV_ROOT CUDA_ROOT=$HIP_CUDA_ENV_ROOT
        export NVCC=$HIP_CUDA_ENV_ROOT/bin/nvcc
        case ":$PATH:" in *":$HIP_CUDA_ENV_ROOT/bin:"*) ;; *) export PATH=$HIP_CUDA_ENV_ROOT/bin:$PATH ;; esac
        export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
        export CUDARC_CUDA_VERSION=13000
        export LIBRARY_PATH=$HIP_CUDA_ENV_ROOT/lib64:$HIP_CUDA_ENV_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
        export CARGO_TARGET_DIR=$HIP_CUDA_ENV_TARGET
        export HIP_CUDA_STUB_LD_PATH=$HIP_CUDA_ENV_STUB_LD_PATH
        unset HIP_CUDA_ENV_ROOT HIP_CUDA_ENV_STUB_LD_PATH HIP_CUDA_ENV_TARGET
    else
        unset HIP_CUDA_ENV_ROOT HIP_CUDA_ENV_STUB_LD_PATH HIP_CUDA_ENV_TARGET
        false
    fi
else
    set -euo pipefail
    _hip_cuda_main
    printf 'cuda-env: ok: CUDA_HOME=%s (source this script to export the build environment)\n' \
        "$HIP_CUDA_ENV_ROOT"
fi
