#!/usr/bin/env bash
# Builds what tiller-llama-server loads at run time: the llama.cpp adapter (examples/llama-cpp/
# build.sh, which provisions llama.cpp once) and the server's C glue, libtiller_llama_host.so,
# into the same folder (target/llama-cpp, or target/llama-cpp-release with --release). Prints
# the library's path.
#   examples/llama-server/build.sh [--release]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$("$root/examples/llama-cpp/build.sh" "$@" | tail -n 1)
llama=${TILLER_LLAMA_DIR:-$("$root/examples/llama-cpp/provision.sh")}
cc -std=c11 -O2 -g -Wall -Wextra -Werror -D_GNU_SOURCE -fPIC -shared \
    -I"$root/examples/llama-cpp" -I"$llama/include" -I"$root/plugin-abi/c/include" \
    -o "$out/libtiller_llama_host.so" "$here/llama_host.c" \
    -L"$out" -ltiller_llama -L"$llama/lib" -lllama -lggml-base -lggml \
    -Wl,-rpath,"$out" -Wl,-rpath,"$llama/lib"
echo "$out/libtiller_llama_host.so"
