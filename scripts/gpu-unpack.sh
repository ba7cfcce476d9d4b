#!/usr/bin/env bash
# On the GPU host: unpack the binaries `make cuda` packed into gpu-bin/cuda-bins.tar.xz and make
# sure the CUDA libraries they link resolve.
#
#   . scripts/gpu-unpack.sh          (source it: it puts the binaries on PATH)
#   hip-cuda-check && hip-kernels-test-hip ...
#
# The binaries land in ${HIP_BIN:-/tmp/hip-bin}. They need libcuda.so.1 (the driver),
# libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13) and libcurand.so.10 (CUDA 13.0). When
# `ldd` finds one missing, the CUDA toolkit and the Python nvidia-* wheels (nvidia/cu13/lib) are
# searched and LD_LIBRARY_PATH is extended. Unpacks with tar + xz, or with python3 where there is no xz.

_hip_unpack() {
    local repo archive dest missing dir lib cands=()
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    archive=${1:-$repo/gpu-bin/cuda-bins.tar.xz}
    dest=${HIP_BIN:-/tmp/hip-bin}
    [[ -f "$archive" ]] || { echo "gpu-unpack: no $archive: run make cuda, and carry [\"gpu-bin\"]" >&2; return 1; }
    mkdir -p "$dest" || return 1
    if command -v xz >/dev/null; then
        tar -xJf "$archive" -C "$dest" || { echo "gpu-unpack: tar -xJf $archive failed" >&2; return 1; }
    else
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
            "$archive" "$dest" || { echo "gpu-unpack: python3 could not unpack $archive" >&2; return 1; }
    fi
    case ":$PATH:" in *":$dest:"*) ;; *) export PATH=$dest:$PATH ;; esac

    missing=$(ldd "$dest"/* 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
    if [[ -n "$missing" ]]; then
        cands=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib
            /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu)
        dir=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) \
            && cands+=("$dir")
        for lib in $missing; do
            for dir in "${cands[@]}"; do
                if [[ -e "$dir/$lib" ]]; then
                    case ":${LD_LIBRARY_PATH:-}:" in *":$dir:"*) ;; *) export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;; esac
                    break
                fi
            done
        done
        missing=$(ldd "$dest"/* 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
    fi
    echo "gpu-unpack: $(find "$dest" -maxdepth 1 -type f | wc -l) binaries in $dest (on PATH)" \
        "${LD_LIBRARY_PATH:+; LD_LIBRARY_PATH=$LD_LIBRARY_PATH}" >&2
    if [[ -n "$missing" ]]; then
        echo "gpu-unpack: still missing: $(echo $missing)" >&2
        return 1
    fi
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    _hip_unpack "$@"
else
    echo "gpu-unpack: source this script (. scripts/gpu-unpack.sh) so that PATH and LD_LIBRARY_PATH stay set" >&2
    _hip_unpack "$@"
fi
