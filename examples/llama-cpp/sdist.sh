#!/usr/bin/env bash
# Downloads the pinned `llama-cpp-python` sdist (it vendors llama.cpp) into FOLDER, checks it
# against its SHA-256 and prints its path: the one source of llama.cpp for provision.sh (the
# libraries) and examples/llama-server/bench/upstream.sh (llama.cpp's own server).
#   examples/llama-cpp/sdist.sh FOLDER
# Prints the sdist's version on stdout with --version. Needs python3 ($TILLER_PYTHON).
set -euo pipefail
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
if [ "${1:-}" = "--version" ]; then echo "$version"; exit 0; fi
out=${1:?usage: sdist.sh FOLDER}
py=${TILLER_PYTHON:-python3}
sdist=llama_cpp_python-$version.tar.gz
# pip cannot download an sdist without preparing its metadata (which builds it): read the
# address from the package index, as pip does, and check the pinned hash.
index=${PIP_INDEX_URL:-https://pypi.org/simple}
url=$("$py" - "$index" "$sdist" <<'PY'
import re, sys, urllib.request, urllib.parse
index, name = sys.argv[1].rstrip("/"), sys.argv[2]
page = urllib.request.urlopen(f"{index}/llama-cpp-python/", timeout=120).read().decode()
for href in re.findall(r'href="([^"]+)"', page):
    if href.split("#")[0].endswith("/" + name):
        print(urllib.parse.urljoin(f"{index}/llama-cpp-python/", href.split("#")[0]))
        break
else:
    sys.exit(f"{name} is not listed in {index}")
PY
)
echo "sdist.sh: downloading $url" >&2
"$py" - "$url" "$out/$sdist" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=600) as r, open(sys.argv[2], "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
PY
echo "$sha256  $out/$sdist" | sha256sum -c --quiet - || { echo "sdist.sh: $sdist does not match its pinned SHA-256" >&2; exit 1; }
echo "$out/$sdist"
