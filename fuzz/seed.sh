#!/usr/bin/env bash
# Fills fuzz/corpus/<target>/ with small seeds: files written here by the Python standard library
# in each format's real layout, the PyTorch fixtures of onnx-export/tests/fixtures, and (when
# `tiller-export` is built) a real dictionary. Nothing here is committed; run it before fuzzing.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd .. && pwd)
corpus=corpus
mkdir -p "$corpus"/{dictionary,safetensors,npz,torch_pt,gguf,config_toml,overrides_json,policy_answer,c_abi}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 - "$corpus" "$tmp" <<'PY'
import io, json, struct, sys, zipfile, os
corpus, tmp = sys.argv[1], sys.argv[2]

def put(target, name, data):
    with open(os.path.join(corpus, target, name), "wb") as f:
        f.write(data)

def npy(shape, values, descr="<f4"):
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        descr, "".join(f"{s}, " for s in shape) if len(shape) != 1 else f"{shape[0]},")
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    fmt = {"<f4": "f", "<f8": "d", "<f2": "e"}[descr]
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + \
        struct.pack("<%d%s" % (len(values), fmt), *values)

# safetensors: f32, f16 and bf16 tensors tiling the data section.
def safetensors(tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data
put("safetensors", "f32", safetensors({"W_enc": ("F32", [2, 3], struct.pack("<6f", *range(6))),
                                       "b_dec": ("F32", [2], struct.pack("<2f", 1, 2))}))
put("safetensors", "halves", safetensors({"a": ("F16", [2], struct.pack("<2e", 1.5, -2)),
                                          "b": ("BF16", [1], b"\x80\x3f")}))
put("safetensors", "empty", safetensors({}))

# .npy (first byte even) and .npz (first byte odd), as the npz target reads them.
a = npy([2, 4], [float(i) for i in range(8)])
put("npz", "npy_f32", b"\x00" + a)
put("npz", "npy_f64", b"\x00" + npy([3], [1.0, 2.0, 3.0], "<f8"))
put("npz", "npy_f16", b"\x00" + npy([2, 2], [1.0, 0.5, -1.0, 2.0], "<f2"))
for comp, tag in ((zipfile.ZIP_STORED, "stored"), (zipfile.ZIP_DEFLATED, "deflated")):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", comp) as z:
        z.writestr("W_dec.npy", a)
        z.writestr("b_dec.npy", npy([4], [0.0, 1.0, 2.0, 3.0]))
    put("npz", "npz_" + tag, b"\x01" + buf.getvalue())

# GGUF v3 control vector: two F32 directions and one F16, with string and u32 metadata.
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b
def gguf(tensors, version=3):
    kv = [(gstr("general.architecture") + struct.pack("<I", 8) + gstr("controlvector")),
          (gstr("controlvector.layer_count") + struct.pack("<I", 4) + struct.pack("<I", len(tensors)))]
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv)) + b"".join(kv)
    data, infos = b"", b""
    for name, ggml_type, raw, n in tensors:
        infos += gstr(name) + struct.pack("<I", 1) + struct.pack("<Q", n) + struct.pack("<I", ggml_type) + struct.pack("<Q", len(data))
        data += raw + b"\0" * ((-len(raw)) % 32)
    out += infos
    out += b"\0" * ((-len(out)) % 32)
    return out + data
put("gguf", "f32", gguf([("direction.1", 0, struct.pack("<4f", 1, 2, 3, 4), 4),
                         ("direction.2", 0, struct.pack("<4f", 0, 1, 0, 1), 4)]))
put("gguf", "f16", gguf([("direction.0", 1, struct.pack("<4e", 1, 2, 3, 4), 4)]))
put("gguf", "v2", gguf([("direction.3", 0, struct.pack("<2f", 1, -1), 2)], version=2))
put("gguf", "npy", npy([2, 4], [float(i) for i in range(8)]))

# The overrides JSON and configs.
for i, o in enumerate([
    '{}',
    '{"profile": "careful"}',
    '{"steer": [{"dictionary": "res12", "op": "clamp", "feature": 12, "value": 0.0}]}',
    '{"steer": [{"dictionary": "res12", "op": "add", "feature": 3, "strength": 2.5, "apply_to": "generated"}], "monitors": {"deception": {"threshold": 2.0}}}',
    '{"disable_profile": true, "steer": []}',
]):
    put("overrides_json", f"o{i}", o.encode())
config = open(os.path.join(tmp, "readme.toml")).read().encode() if os.path.exists(os.path.join(tmp, "readme.toml")) else b""
if config:
    put("config_toml", "readme", config)
put("config_toml", "minimal", b'[runtime]\nexecution_provider = "cpu"\nthreads = 1\n')
put("config_toml", "empty", b"")

# Policy answers: 8-byte answer then guest memory holding action records at offset 16.
def record(code, feature=0, value=0.0, sptr=0, slen=0):
    return struct.pack("<IIfII", code, feature, value, sptr, slen)
mem = b"\0" * 16 + record(1, sptr=200, slen=5) + record(4, 7, 0.5) + record(6, 9, -1.0) + \
    record(2, sptr=205, slen=7) + record(3) + record(5, 3) + record(7)
mem = mem.ljust(200, b"\0") + b"hello" + b"careful"
put("policy_answer", "all", struct.pack("<q", (16 << 32) | 7) + mem)
put("policy_answer", "none", struct.pack("<q", 0) + mem)

# The C ABI: u16-length fields (toml, overrides, tokens, activations) then four knob bytes.
def field(b):
    return struct.pack("<H", len(b)) + b
# The target writes `d.onnx` (16 -> 32 features, hook model.layers.0) into the configs' base folder.
with_dict = b"""[runtime]
threads = 1

[[dictionary]]
name = "d"
path = "d.onnx"

[[monitor]]
name = "m"
dictionary = "d"
features = [1, 2, 3]
threshold = 0.1
window = "token"
action = "flag"

[[monitor]]
name = "r"
dictionary = "d"
features = [4]
threshold = 0.05
window = "request"
aggregate = "count"
count = 2
action = "stop"

[[profile]]
name = "x"
[[profile.steer]]
name = "a"
dictionary = "d"
op = "ablate"
feature = 3
[[profile.steer]]
name = "c"
dictionary = "d"
op = "clamp"
feature = 5
value = 1.0
[[profile.steer]]
name = "p"
dictionary = "d"
op = "add"
feature = 7
strength = 2.0
apply_to = "generated"
"""
for i, (t, o) in enumerate([(b'[runtime]\nthreads = 1\n', b'{}'), (b'', b''), (config, b'{"profile": "x"}'),
                            (with_dict, b'{"profile": "x"}'), (with_dict, b'{}'),
                            (with_dict, b'{"steer": [{"dictionary": "d", "op": "add", "feature": 9, "strength": 1.5}]}')]):
    put("c_abi", f"c{i}", field(t) + field(o) + field(b"\x00\x01\x80") + field(bytes(range(32))) + bytes([64, 200, 0, 4]))
    put("c_abi", f"w{i}", field(t) + field(o) + field(b"\x00\x01\x80\x81") + field(bytes(range(0, 256, 3))) + bytes([64, 200, 0, 16]))
PY

# The config reference's whole-file example (docs/config.md), every section once.
awk '/^\[runtime\]/{p=1} p&&/^```/{exit} p' "$root/docs/config.md" > "$corpus/config_toml/reference" || true

# PyTorch checkpoints in every layout the importers read, and the hostile ones the tests refuse.
python3 "$root/onnx-export/tests/fixtures/make_torch_fixtures.py" "$tmp/pt" >/dev/null 2>&1 || true
find "$tmp/pt" -type f -size -64k 2>/dev/null | head -40 | while read -r f; do
    cp "$f" "$corpus/torch_pt/$(echo "${f#"$tmp/pt/"}" | tr / _)"
done

# A real dictionary (a `vector` dictionary from diffmeans) when tiller-export is built.
exporter="${TILLER_EXPORT:-$root/target/debug/tiller-export}"
if [ -x "$exporter" ]; then
    python3 - "$tmp" <<'PY'
import struct, sys
def npy(shape, values):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % shape
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + struct.pack("<%df" % len(values), *values)
open(sys.argv[1] + "/pos.npy", "wb").write(npy((3, 8), [float(i % 5) for i in range(24)]))
open(sys.argv[1] + "/neg.npy", "wb").write(npy((3, 8), [float(i % 3) for i in range(24)]))
PY
    "$exporter" diffmeans --positive "$tmp/pos.npy" --negative "$tmp/neg.npy" --hook model.layers.0 \
        --name seed -o "$tmp/vec.onnx" >/dev/null 2>&1 && cp "$tmp/vec.onnx" "$corpus/dictionary/vector"
fi
printf '\x08\x07' > "$corpus/dictionary/tiny"
for d in "$corpus"/*/; do echo "$(basename "$d"): $(ls "$d" | wc -l) seeds, $(du -sk "$d" | cut -f1) KB"; done
