#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the sources the rest of the project runs: the pinned
# `llama-cpp-python` sdist (the one examples/llama-cpp/provision.sh provisions; it vendors llama.cpp
# under vendor/llama.cpp), checked against the same SHA-256 and built with the same switches
# (Release, GGML_NATIVE off, GGML_OPENMP off), so that the benchmark's reference runs the same
# kernels as tiller-llama-server. The binary is linked statically against llama.cpp and cached as
#   $TILLER_CACHE_DIR/llama-server-0.3.36/bin/llama-server
# and this script prints that path. Needs python3, cmake (3.21 or later) and a C++ compiler.
#   examples/llama-server/bench/upstream.sh     # builds on first use (several minutes on 2 cores)
# CMAKE_BUILD_PARALLEL_LEVEL sets the jobs (default: all cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
version=$("$root/examples/llama-cpp/sdist.sh" --version)
py=${TILLER_PYTHON:-python3}
cache=${TILLER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tiller}
dir=$cache/llama-server-$version
if [ -f "$dir/ready" ]; then echo "$dir/bin/llama-server"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.llama-server.lock"
flock 9
if [ -f "$dir/ready" ]; then echo "$dir/bin/llama-server"; exit 0; fi
command -v cmake >/dev/null || { echo "upstream.sh: cmake not found (apt-get install cmake)" >&2; exit 1; }

work=$(mktemp -d "$cache/.llama-server.XXXXXX")
trap 'rm -rf "$work"' EXIT
path=$("$root/examples/llama-cpp/sdist.sh" "$work")
sdist=$(basename "$path")
tar -xzf "$work/$sdist" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp"
src=$work/llama_cpp_python-$version/vendor/llama.cpp

jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "upstream.sh: building llama-server (cmake, $jobs jobs)" >&2
# Static libraries: one self-contained binary in the cache. Nothing from the network: the
# benchmark loads a local file (no curl, no OpenSSL; older trees name the switch LLAMA_CURL, this
# one LLAMA_OPENSSL), and the web UI, which the build would otherwise fetch from Hugging Face, is
# left out (the server answers the API without it).
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$work/build" --target llama-server -j "$jobs" >&2

mkdir -p "$work/bin"
cp "$work/build/bin/llama-server" "$work/bin/"
"$work/bin/llama-server" --version >&2 || true
rm -rf "$work/build" "$work/llama_cpp_python-$version" "$work/$sdist"
touch "$work/ready"
rm -rf "$dir"
mv "$work" "$dir"
trap - EXIT
echo "$dir/bin/llama-server"
