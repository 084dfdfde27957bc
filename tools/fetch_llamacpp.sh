#!/usr/bin/env bash
# Fetch llama.cpp (the peer engine of benchmarks/bench_peers.py) and trim it to a tree that can be carried to
# the GPU box (which has no internet): the llama-cpp-python sdist on PyPI vendors llama.cpp under
# vendor/llama.cpp. Models, docs, tests, benches, pocs, the web UI and every backend except CPU and CUDA are
# removed; vendor/ (miniaudio included) stays because CMake adds it. The source itself is never committed.
#
#   bash tools/fetch_llamacpp.sh [DEST]        # DEST default: .carry/llama.cpp (git-ignored); about 22 MiB
#
# Then carry DEST to the box (run(carry=[".carry/llama.cpp"])) and build it there with tools/build_llamacpp.sh.
set -euo pipefail

VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$REPO/.carry/llama.cpp}"
# the script cds into the sdist below, where a relative DEST would land
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

if [ -e "$DEST" ]; then
    echo "fetch_llamacpp: $DEST exists; remove it first to fetch again" >&2
    exit 1
fi
SDIST="${LLAMACPP_SDIST:-}"   # an already downloaded llama_cpp_python-VERSION.tar.gz (skips pip)
if [ -z "$SDIST" ]; then
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP" >&2
    SDIST="$TMP/llama_cpp_python-$VERSION.tar.gz"
fi
tar xzf "$SDIST" -C "$TMP"
SRC="$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "fetch_llamacpp: no vendor/llama.cpp in the sdist of $VERSION" >&2; exit 1; }

cd "$SRC"
rm -rf models docs tests benches pocs tools/ui media examples/*/  .github ci skills
# Every ggml backend but CPU and CUDA (ggml_add_backend only descends into enabled ones).
for d in ggml/src/ggml-*/; do
    case "$(basename "$d")" in
        ggml-cpu|ggml-cuda) ;;
        *) rm -rf "$d" ;;
    esac
done
# CPU code for other processors (CMake lists these sources only in the branch of their architecture).
rm -rf ggml/src/ggml-cpu/spacemit ggml/src/ggml-cpu/kleidiai
for d in ggml/src/ggml-cpu/arch/*/; do
    [ "$(basename "$d")" = x86 ] || rm -rf "$d"
done
# The server and CLI (added only with LLAMA_BUILD_SERVER=ON).
rm -rf tools/server tools/cli
# miniaudio.h (4 MB) is compiled only into mtmd, which the benchmark targets never build; CMake still adds
# vendor/miniaudio, so the folder stays with a header that stops any build that does include it.
printf '#error "miniaudio.h was removed by tiered tools/fetch_llamacpp.sh: build only llama-bench, llama-batched-bench, llama-quantize"\n' \
    > vendor/miniaudio/miniaudio.h
mkdir -p "$(dirname "$DEST")"
cp -a "$SRC" "$DEST"
du -sh "$DEST"
