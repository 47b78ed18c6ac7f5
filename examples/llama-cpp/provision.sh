#!/usr/bin/env bash
# Gets llama.cpp the reproducible way: the pinned `llama-cpp-python` sdist from PyPI (it vendors
# llama.cpp), checked against its SHA-256 (sdist.sh) and built once into a wheel with cmake (shared
# libraries, no server, no tests, no examples, GGML_NATIVE off so the binary runs on any x86-64),
# cached under $TILLER_CACHE_DIR/llama-cpp-python-0.3.36/. Nothing from it is committed.
#
# The cache folder then holds:
#   wheel/llama_cpp_python-0.3.36-*.whl   the Python package with libllama.so and libggml*.so
#   include/                              llama.h and the ggml headers, from the same sdist
#   lib/                                  the wheel's shared libraries, for C hosts to link
# and this script prints that folder. Needs python3 with pip, cmake (3.21 or later) and a C++ compiler.
#   examples/llama-cpp/provision.sh        # prints the folder (builds on first use: ~8 min on 2 cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$("$here/sdist.sh" --version)
py=${TILLER_PYTHON:-python3}
cache=${TILLER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tiller}
dir=$cache/llama-cpp-python-$version
if [ -f "$dir/ready" ]; then echo "$dir"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.llama-cpp-python.lock"
flock 9
if [ -f "$dir/ready" ]; then echo "$dir"; exit 0; fi
command -v cmake >/dev/null || { echo "provision.sh: cmake not found (apt-get install cmake)" >&2; exit 1; }

work=$(mktemp -d "$cache/.llama-cpp-python.XXXXXX")
trap 'rm -rf "$work"' EXIT
path=$("$here/sdist.sh" "$work")
sdist=$(basename "$path")

echo "provision.sh: building llama.cpp (cmake, $(nproc) jobs; about 8 minutes on 2 cores)" >&2
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
"$py" -m pip wheel --no-deps -w "$work/wheel" "$work/$sdist" >&2

mkdir -p "$work/include" "$work/lib" "$work/src"
tar -xzf "$work/$sdist" -C "$work/src" \
    "llama_cpp_python-$version/vendor/llama.cpp/include" "llama_cpp_python-$version/vendor/llama.cpp/ggml/include"
cp "$work/src/llama_cpp_python-$version/vendor/llama.cpp/include/"*.h "$work/include/"
cp "$work/src/llama_cpp_python-$version/vendor/llama.cpp/ggml/include/"*.h "$work/include/"
"$py" - "$work/wheel"/*.whl "$work/lib" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("llama_cpp/lib/") and ".so" in n:
            out = os.path.join(sys.argv[2], os.path.basename(n))
            with open(out, "wb") as f:
                f.write(z.read(n))
PY
rm -rf "$work/src" "$work/$sdist"
touch "$work/ready"
rm -rf "$dir"
mv "$work" "$dir"
trap - EXIT
echo "$dir"
