#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU (and, for the vLLM part, the CUDA build of vLLM 0.32),
#   1. the kernel tests natively on the device (tests/paged: every Triton kernel against its torch twin)
#   2. the CUDA path inside vLLM on the default model, without the interpreter (tests/gpu)
#   3. the kernel benchmarks: lane attention, TokenSelect, compaction
# and one JSON, $OUT/gpu_check.json (default OUT=gpu-check), with every part's result. Exits non-zero
# if a part fails, and at once, saying so, where no GPU is visible (it never skips silently).
#   scripts/gpu_check.sh            (or: make gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-gpu-check}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch ($PY); this check needs one (the CPU runs the same code under" \
       "the Triton interpreter in make test)" >&2
  exit 2
fi
mkdir -p "$OUT"
status=0
run() {  # name, command...: run a part, keep its exit code and log
  local name=$1; shift
  echo "gpu_check: $name" >&2
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc" >> "$OUT/parts.txt"
  [ $rc -eq 0 ] || { status=1; tail -n 20 "$OUT/$name.log" >&2; }
}
: > "$OUT/parts.txt"
run kernels "$PY" -m pytest -q tests/paged -p no:cacheprovider
if "$PY" -c "import vllm.platforms as p, sys; sys.exit(0 if p.current_platform.is_cuda() else 1)" 2>/dev/null; then
  run cuda_path "$PY" -m pytest -q tests/gpu -p no:cacheprovider -m gpu
else
  echo "cuda_path 3" >> "$OUT/parts.txt"  # 3: not run, named in the JSON
  echo "gpu_check: the CUDA build of vLLM is not installed: the in-vLLM part did not run" >&2
  status=1
fi
run bench_lane_attention "$PY" scripts/bench_lane_attention.py --out "$OUT"
run bench_token_select "$PY" scripts/bench_token_select.py --contexts 32768,131072 --out "$OUT"
run bench_compaction "$PY" scripts/bench_compaction.py --out "$OUT"
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = {name: {"exit_code": int(code), "ok": code == "0", "not_run": code == "3"}
         for name, code in (line.split() for line in (out / "parts.txt").read_text().splitlines())}
doc = {"parts": parts}
for name in ("bench_lane_attention", "bench_token_select", "bench_compaction"):
    path = out / f"{name}.json"
    if path.is_file():
        doc[name] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
print(f"gpu_check: wrote {out / 'gpu_check.json'}")
PYEOF
exit $status
