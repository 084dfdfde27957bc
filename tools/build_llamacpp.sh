#!/usr/bin/env bash
# Build llama.cpp's benchmark tools (llama-bench, llama-batched-bench, llama-quantize) on the GPU box, from the
# trimmed source that tools/fetch_llamacpp.sh makes and the device call carries (.carry/llama.cpp).
# Idempotent: does nothing when BUILD/bin/llama-bench exists (files under /root stay while the box is warm).
# About 4 minutes with 16 jobs on the H200 box.
#
#   bash tools/build_llamacpp.sh [SRC] [BUILD]     # defaults: .carry/llama.cpp and /root/lb
#   LLAMA_CUDA=OFF JOBS=2 bash tools/build_llamacpp.sh .carry/llama.cpp /tmp/lbcpu   # CPU-only (pipeline checks)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${1:-$REPO/.carry/llama.cpp}"
BUILD="${2:-/root/lb}"
JOBS="${JOBS:-16}"
CUDA="${LLAMA_CUDA:-ON}"
ARCH="${CUDA_ARCH:-90}"
TARGETS=(llama-bench llama-batched-bench llama-quantize)

have_all() { for t in "${TARGETS[@]}"; do [ -x "$BUILD/bin/$t" ] || return 1; done; }
if have_all; then
    echo "build_llamacpp: $BUILD/bin already has ${TARGETS[*]}; nothing to do"
    exit 0
fi
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "build_llamacpp: no llama.cpp source at $SRC: run tools/fetch_llamacpp.sh here and carry .carry/llama.cpp" >&2
    exit 1
fi
mkdir -p "$(dirname "$BUILD")"
T0=$(date +%s)
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_CUDA="$CUDA" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF)
if [ "$CUDA" = ON ]; then
    flags+=(-DCMAKE_CUDA_ARCHITECTURES="$ARCH")
    if ! command -v nvcc >/dev/null; then  # the CUDA toolkit is often installed without being on PATH
        for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
            [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break
        done
    fi
    command -v nvcc >/dev/null || { echo "build_llamacpp: no nvcc found (PATH, /usr/local/cuda*/bin)" >&2; exit 1; }
fi
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$SRC" -B "$BUILD" "${gen[@]}" "${flags[@]}" >"$BUILD.configure.log" 2>&1 || {
    tail -40 "$BUILD.configure.log" >&2; echo "build_llamacpp: cmake configure failed (log $BUILD.configure.log)" >&2
    exit 1; }
T1=$(date +%s)
echo "build_llamacpp: configured in $((T1 - T0)) s"
cmake --build "$BUILD" --target "${TARGETS[@]}" -j "$JOBS" >"$BUILD.build.log" 2>&1 || {
    tail -40 "$BUILD.build.log" >&2; echo "build_llamacpp: build failed (log $BUILD.build.log)" >&2; exit 1; }
T2=$(date +%s)
have_all || { echo "build_llamacpp: the build finished but $BUILD/bin lacks one of ${TARGETS[*]}" >&2; exit 1; }
echo "build_llamacpp: built ${TARGETS[*]} in $((T2 - T0)) s (configure $((T1 - T0)) s, compile $((T2 - T1)) s) -> $BUILD/bin"
