#!/usr/bin/env bash
# Builds the llama.cpp adapter against the provisioned llama.cpp (provision.sh) and libtiller:
#   $OUT/libtiller_llama.so   the adapter (tiller_llama.h), for C/C++ hosts and the Python adapter
#   $OUT/tiller-llama-run     the command-line host the tests and the overhead measurement run
# OUT is target/llama-cpp (target/llama-cpp-release with --release; under $CARGO_TARGET_DIR when
# set). Prints OUT.
#   examples/llama-cpp/build.sh [--release]     # libtiller from target/debug (or target/release)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=debug
cargo_flags=()
if [ "${1:-}" = "--release" ]; then profile=release; cargo_flags=(--release); fi
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target=$root/$target ;; esac
llama=${TILLER_LLAMA_DIR:-$("$here/provision.sh")}
(cd "$root" && cargo build -q -p tiller-capi "${cargo_flags[@]}")
libtiller=$target/$profile
out=$target/llama-cpp
if [ "$profile" = release ]; then out=$target/llama-cpp-release; fi
mkdir -p "$out"
cflags=(-std=c11 -O2 -g -Wall -Wextra -Werror -D_GNU_SOURCE -fPIC
        -I"$here" -I"$llama/include" -I"$root/plugin-abi/c/include")
ldflags=(-L"$llama/lib" -L"$libtiller" -lllama -lggml-base -lggml -ltiller -lm
         -Wl,-rpath,"$llama/lib" -Wl,-rpath,"$libtiller")
cc "${cflags[@]}" -shared -o "$out/libtiller_llama.so" "$here/tiller_llama.c" "${ldflags[@]}"
cc "${cflags[@]}" -o "$out/tiller-llama-run" "$here/tiller_llama_run.c" \
    -L"$out" -ltiller_llama -Wl,-rpath,"$out" "${ldflags[@]}"
echo "$out"
