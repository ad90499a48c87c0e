#!/usr/bin/env bash
# Builds the GPU suite into one folder that runs on a GPU machine without Rust:
#
#   scripts/gpu-bundle.sh            -> gpu-bundle/ and gpu-bundle.tar.gz (git-ignored; BUNDLE=<dir>)
#   gpu-bundle/run.sh                -> runs everything, logs under ${OUT:-./gpu-logs}, table last
#
# The bundle holds the GPU test executables (tests/cuda_*.rs), the CUDA bench executables
# (benches/cuda_*.rs) and the xsam CLI, all built in release mode with the kernels compiled by the
# pinned nvcc (scripts/install-cuda-toolchain.sh runs first when .venv-cuda is missing). run.sh
# needs only a CUDA driver and the cuBLAS libraries (libcublasLt.so*, found with `find /` once);
# on a machine where nvidia-smi sees no GPU it says so and exits 0.
#
# run.sh runs every test executable with XSAM_REQUIRE_GPU=1 (a skip is a failure there) and
# --nocapture, skipping the build-tree checks that need this checkout (ptxas spill reports, host
# emulators: CI runs those), then every bench executable with a short measurement time. It
# prints LAST a table: kernel/stage, parity error vs CPU, median time, achieved rate, ratio to the
# measured ceiling and the target ratio where an issue sets one. The table is built from lines that tests and benches print on stdout:
#
#   PARITY <name> max_abs=<x> max_rel=<y>          a GPU result vs its CPU/f64 reference
#   RATE <name> median_ms=<t> tflops=<f> [target=<p>]  a timed kernel or stage (compute-bound)
#   RATE <name> median_ms=<t> gbs=<g> [target=<p>]     a timed kernel or stage (memory-bound)
#   CEILING gemm_bf16 tflops=<f>                   the card's measured bf16 GEMM rate
#   CEILING copy gbs=<g>                           the card's measured device copy bandwidth
#
# <name> has no spaces; a PARITY and a RATE line with the same name share a row, and a RATE name
# `<kernel>.<shape>` without its own PARITY line shows the PARITY of `<kernel>` (a PARITY name
# printed by several tests keeps the worst values). tflops rates are compared with the gemm_bf16
# ceiling, gbs rates with the copy ceiling (the largest value printed by any bench); `target=<p>`
# is the percentage of that ceiling an issue asks for (shown, with "!" when the row is below it).
# Tests print PARITY through tests/gpu/mod.rs (`Parity`), benches RATE / CEILING through
# benches/gpu_common/mod.rs. New GPU tests and benches adopt the suite by printing these lines.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BUNDLE="${BUNDLE:-$REPO/gpu-bundle}"
log() { echo "[gpu-bundle] $*"; }

if [[ ! -x "$REPO/.venv-cuda/cuda/bin/nvcc" ]]; then
  log "no .venv-cuda: installing the CUDA toolchain"
  scripts/install-cuda-toolchain.sh
fi
export NVCC="$REPO/.venv-cuda/cuda/bin/nvcc"
log "nvcc: $NVCC"

TEST_NAMES=()
for f in tests/cuda_*.rs; do TEST_NAMES+=("$(basename "$f" .rs)"); done
BENCH_NAMES=()
for f in benches/cuda_*.rs; do BENCH_NAMES+=("$(basename "$f" .rs)"); done
test_args=()
for t in "${TEST_NAMES[@]}"; do test_args+=(--test "$t"); done
bench_args=()
for b in "${BENCH_NAMES[@]}"; do bench_args+=(--bench "$b"); done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

log "building tests: ${TEST_NAMES[*]}"
cargo test --release --no-run --message-format=json "${test_args[@]}" >"$TMP/tests.json"
log "building benches: ${BENCH_NAMES[*]}"
cargo bench --no-run --message-format=json "${bench_args[@]}" >"$TMP/benches.json"
log "building xsam"
cargo build --release --bin xsam --message-format=json >"$TMP/xsam.json"

# The executables cargo reports for the targets asked for (kind test / bench / bin).
exes() { # <json> <kind>
  python3 - "$1" "$2" <<'EOF'
import json, sys
path, kind = sys.argv[1], sys.argv[2]
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if kind in m["target"]["kind"]:
        print(m["target"]["name"] + "\t" + m["executable"])
EOF
}

# The kernels must really be in: a bundle without them would only skip (and fail, with
# XSAM_REQUIRE_GPU=1) on the GPU machine.
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
FATBIN="$(ls -t "$TARGET_DIR"/release/build/xsam-*/out/xsam_kernels.fatbin 2>/dev/null | head -n1 || true)"
if [[ -z "$FATBIN" || ! -s "$FATBIN" ]]; then
  echo "error: no kernels fatbin under $TARGET_DIR/release/build/xsam-*/out/: nvcc did not run" >&2
  exit 1
fi
log "kernels: $FATBIN ($(wc -c <"$FATBIN") bytes)"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/tests" "$BUNDLE/benches" "$BUNDLE/bin"
while IFS=$'\t' read -r name exe; do cp "$exe" "$BUNDLE/tests/$name"; done < <(exes "$TMP/tests.json" test)
while IFS=$'\t' read -r name exe; do cp "$exe" "$BUNDLE/benches/$name"; done < <(exes "$TMP/benches.json" bench)
while IFS=$'\t' read -r name exe; do cp "$exe" "$BUNDLE/bin/$name"; done < <(exes "$TMP/xsam.json" bin)
for t in "${TEST_NAMES[@]}"; do [[ -x "$BUNDLE/tests/$t" ]] || { echo "error: test $t was not built" >&2; exit 1; }; done
for b in "${BENCH_NAMES[@]}"; do [[ -x "$BUNDLE/benches/$b" ]] || { echo "error: bench $b was not built" >&2; exit 1; }; done
[[ -x "$BUNDLE/bin/xsam" ]] || { echo "error: xsam was not built" >&2; exit 1; }
# Release builds keep debug info (profile.release debug = 1): drop it from the copies, keeping the
# symbols for backtraces (about 700 MB -> 115 MB; most of the rest is the fatbin in each file).
if command -v strip >/dev/null 2>&1; then
  for f in "$BUNDLE"/tests/* "$BUNDLE"/benches/* "$BUNDLE"/bin/*; do strip --strip-debug "$f"; done
fi

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built:  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nvcc:   $("$NVCC" --version | tail -n1)"
  echo "fatbin: $(wc -c <"$FATBIN") bytes"
} >"$BUNDLE/BUILD_INFO"

cat >"$BUNDLE/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the xsam GPU suite (see BUILD_INFO). Logs go to ${OUT:-./gpu-logs}; a table comes last.
# Exit status: 0 when everything passed or when no GPU is visible, 1 when a test or bench failed.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-./gpu-logs}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cat "$HERE/BUILD_INFO"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-bundle: no GPU visible (nvidia-smi is missing or lists no device): nothing to run."
  exit 0
fi
nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true

# cuBLASLt is loaded at run time by name (libcublasLt.so, .so.13, .so.12, ...): put the folder of
# one (a CUDA 13 one first) on LD_LIBRARY_PATH.
if [[ -z "${XSAM_SKIP_LIB_SEARCH:-}" ]]; then
  libs="$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -name 'libcublasLt.so*' -print 2>/dev/null)"
  lib="$(grep 'libcublasLt\.so\.13' <<<"$libs" | head -n1)"
  [[ -n "$lib" ]] || lib="$(head -n1 <<<"$libs")"
  if [[ -n "$lib" ]]; then
    echo "cuBLASLt: $lib"
    export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "warning: no libcublasLt.so* on this machine: the GEMM tests and benches will fail"
  fi
fi

export XSAM_REQUIRE_GPU=1
export XSAM_BENCH_ROUNDS="${XSAM_BENCH_ROUNDS:-9}"
status=()
failed=0
run_one() { # <kind> <exe> <args...>
  local kind="$1" exe="$2"; shift 2
  local name; name="$(basename "$exe")"
  local logf="$OUT/$kind-$name.log"
  echo "== $kind $name (log: $logf)"
  local t0=$SECONDS
  "$exe" "$@" >"$logf" 2>&1
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    status+=("ok     $kind $name ($((SECONDS - t0)) s)")
  else
    status+=("FAILED $kind $name ($((SECONDS - t0)) s, exit $rc): see $logf")
    failed=1
  fi
}

"$HERE/bin/xsam" --help >"$OUT/xsam-help.log" 2>&1 && status+=("ok     bin xsam --help") \
  || { status+=("FAILED bin xsam --help: see $OUT/xsam-help.log"); failed=1; }
for t in "$HERE"/tests/*; do
  # Build-tree checks (ptxas spill reports, host emulators) need the checkout: CI runs them.
  run_one test "$t" --nocapture --test-threads=1 --skip spills --skip host_emulation
done
for b in "$HERE"/benches/*; do
  run_one bench "$b" --bench --warm-up-time 1 --measurement-time 2
done

echo
for s in "${status[@]}"; do echo "$s"; done
echo

# The table, from the PARITY / RATE / CEILING lines of every log (convention in gpu-bundle.sh).
cat "$OUT"/*.log | tr -d '\r' | awk '
  function val(field,   i, kv) {
    for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == field) return kv[2] }
    return ""
  }
  function add(name) { if (!(name in seen)) { seen[name] = 1; order[++n] = name } }
  # The PARITY name that a row shows: its own, else that of its kernel (the part before the dot).
  function pkey(k,   p) {
    if (k in pabs) return k
    p = k; sub(/\..*/, "", p)
    return (p in pabs) ? p : ""
  }
  $1 == "CEILING" && $2 == "gemm_bf16" { v = val("tflops") + 0; if (v > tf) tf = v }
  $1 == "CEILING" && $2 == "copy"      { v = val("gbs") + 0;    if (v > bw) bw = v }
  $1 == "PARITY" { add($2); a = val("max_abs"); r = val("max_rel")
                   # The same kernel checked by several tests: keep the worst of each.
                   if (!($2 in pabs) || a + 0 > pabs[$2] + 0) pabs[$2] = a
                   if (!($2 in prel) || r + 0 > prel[$2] + 0) prel[$2] = r }
  $1 == "RATE"   { add($2); israte[$2] = 1; ms[$2] = val("median_ms"); t = val("tflops"); g = val("gbs")
                   if (t != "") { rate[$2] = t " TFLOP/s"; tf_of[$2] = t }
                   else if (g != "") { rate[$2] = g " GB/s"; gb_of[$2] = g }
                   if (val("target") != "") target[$2] = val("target") }
  END {
    for (i = 1; i <= n; i++) { k = order[i]; if (k in israte) { p = pkey(k); if (p != "" && p != k) shown[p] = 1 } }
    printf "%-40s %-22s %12s %16s %9s %8s\n", "kernel/stage", "parity (abs / rel)", "median ms", "achieved", "ceiling", "target"
    for (i = 1; i <= n; i++) {
      k = order[i]
      if (!(k in israte) && (k in shown)) continue   # shown on its kernel rows
      p = pkey(k)
      par = (p != "") ? sprintf("%s / %s", pabs[p], prel[p]) : "-"
      r = "-"; pct = -1
      if ((k in tf_of) && tf > 0) pct = 100 * tf_of[k] / tf
      if ((k in gb_of) && bw > 0) pct = 100 * gb_of[k] / bw
      if (pct >= 0) r = sprintf("%.0f%%", pct)
      tg = "-"
      if (k in target) tg = sprintf(">=%s%%%s", target[k], (pct < 0) ? "" : (pct >= target[k] + 0 ? "" : "!"))
      printf "%-40s %-22s %12s %16s %9s %8s\n", k, par, (k in ms) ? ms[k] : "-", (k in rate) ? rate[k] : "-", r, tg
    }
    printf "ceilings (measured): bf16 GEMM %s TFLOP/s, device copy %s GB/s\n", (tf > 0 ? tf : "-"), (bw > 0 ? bw : "-")
    printf "target: the share of the ceiling issues 10 / 11 ask for; \"!\" marks a row below it\n"
  }'
if [[ $failed -ne 0 ]]; then
  echo "gpu-bundle: some tests or benches FAILED (see above)"
fi
exit $failed
RUN
chmod +x "$BUNDLE/run.sh"
# One archive to move around (about 30 MB): tar -xzf gpu-bundle.tar.gz && gpu-bundle/run.sh
tar -C "$(dirname "$BUNDLE")" -czf "$BUNDLE.tar.gz" "$(basename "$BUNDLE")"
log "bundle ready: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1)), archive $BUNDLE.tar.gz ($(du -sh "$BUNDLE.tar.gz" | cut -f1))"
log "on the GPU machine: tar -xzf $(basename "$BUNDLE").tar.gz && $(basename "$BUNDLE")/run.sh"
