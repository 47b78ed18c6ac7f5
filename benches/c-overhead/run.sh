#!/usr/bin/env bash
# The cost of one hook call at batch 1 through the C ABI next to the Rust host API, on the config of
# benches/benches/hook.rs (d_in 2304, a 16384-feature ReLU SAE, 64 monitored features, 4 rules).
#
#   benches/c-overhead/run.sh                  # everything, criterion included (a few minutes)
#   NO_CRITERION=1 benches/c-overhead/run.sh   # skip criterion (shows its last stored figure)
#   ROUNDS=200 REPEAT=2                        # timing rounds per run; C/Rust runs, alternated
#
# Three figures: the C program (overhead.c: tiller_step_open + tiller_step_hook + tiller_step_close),
# the same loop through the Rust API (`overhead_rust_api` in plugin-abi/c/tests/c_abi.rs, built in
# release like libtiller.so), and criterion's `hook_2304x16k_64feat_4rules/tiller/1`. The C and Rust
# loops share the dictionary, the config, the activations and the method (a fresh copy of the
# activations per call, 1024 per timed loop, made outside it); the overhead is their difference.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-200}
REPEAT=${REPEAT:-2}
target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
out=$target/c-overhead
mkdir -p "$out"

echo "== build (release)"
cargo build --release -p tiller-capi
echo "== dictionary and config -> $out"
TILLER_C_OVERHEAD_DIR=$out cargo test -q --release -p tiller-capi --test c_abi -- \
  --ignored --exact overhead_fixture >/dev/null
${CC:-cc} -std=c11 -O2 -Wall -Wextra -Werror -I plugin-abi/c/include benches/c-overhead/overhead.c \
  -o "$out/overhead" -L "$target/release" -ltiller -Wl,-rpath,"$target/release" -lm

: >"$out/results.txt"
for i in $(seq "$REPEAT"); do
  echo "== run $i: C ABI"
  "$out/overhead" "$out/tiller.toml" "$ROUNDS" | tee -a "$out/results.txt"
  echo "== run $i: Rust API, same loop"
  TILLER_C_OVERHEAD_DIR=$out TILLER_C_OVERHEAD_ROUNDS=$ROUNDS \
    cargo test -q --release -p tiller-capi --test c_abi -- --ignored --exact overhead_rust_api \
    --nocapture | grep '^rust' | tee -a "$out/results.txt"
done

estimates=$target/criterion/hook_2304x16k_64feat_4rules/tiller/1/new/estimates.json
if [ -z "${NO_CRITERION:-}" ]; then
  echo "== criterion: hook_2304x16k_64feat_4rules/tiller/1"
  cargo bench -q -p tiller-benches --bench hook -- 'hook_2304x16k_64feat_4rules/tiller/1$' |
    grep -A3 'tiller/1' || true
fi

python3 - "$out/results.txt" "$estimates" <<'PY'
import json, os, re, sys
results, estimates = sys.argv[1], sys.argv[2]
best = {}
for line in open(results):
    m = re.match(r"(c_abi|rust)\s+(.+?)\s+median\s+([\d.]+)", line)
    if m:
        key = (m.group(1), m.group(2))
        best[key] = min(best.get(key, float("inf")), float(m.group(3)))
crit = None
if os.path.exists(estimates):
    crit = json.load(open(estimates))["mean"]["point_estimate"]
print()
print("one hook call at batch 1 (ns per call; the best median of the runs)")
print(f"| {'what':<26} | {'C ABI':>8} | {'Rust API':>8} | {'C - Rust':>8} |")
print(f"| {'-' * 26} | {'-' * 8} | {'-' * 8} | {'-' * 8} |")
for what in ("open+hook+close", "open+close (no hook)", "0 tokens: open+hook+close"):
    c, r = best.get(("c_abi", what)), best.get(("rust", what))
    if c is not None and r is not None:
        print(f"| {what:<26} | {c:8.1f} | {r:8.1f} | {c - r:8.1f} |")
if crit is not None:
    age = "" if not os.environ.get("NO_CRITERION") else " (stored from an earlier run)"
    print(f"criterion hook_2304x16k_64feat_4rules/tiller/1: {crit:.1f} ns per call{age}")
PY
