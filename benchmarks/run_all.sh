#!/usr/bin/env bash
# Regenerate every table in benchmarks/results/ on THIS machine, in dependency order.
#
#   RUNS='/work/runs/*' benchmarks/run_all.sh          # workstation: convert run dirs, then measure
#   BUNDLES=~/zoo-bundles DEVICE=1 benchmarks/run_all.sh  # Raspberry Pi: bundles copied over, no TensorFlow
#
# Variables (all optional):
#   PYTHON   interpreter with leukoedge installed     (default: python3)
#   RUNS     glob of training run dirs to convert       (default: runs/*; ignored when DEVICE=1)
#   BUNDLES  folder of converted bundles                (default: /tmp/leukoedge-bench/bundles)
#   QUANT_RUN run dir for the quantisation-mode table   (default: the mobilenetv2-1.0 run among RUNS)
#   TFLRT_PYTHON second env with tflite-runtime         (default: /tmp/tflrt/bin/python)
#   IMAGES   folder of real images to classify          (default: synthetic smears / seeded noise)
#   OUT      where the tables go                        (default: benchmarks/results)
#   DEVICE=1 skip every step that needs TensorFlow
#   QUICK=1  fewer runs (smoke test of the scripts, not for committing)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-runs/*}
BUNDLES=${BUNDLES:-${TMPDIR:-/tmp}/leukoedge-bench/bundles}
WORK=$(dirname "$BUNDLES")
TFLRT_PYTHON=${TFLRT_PYTHON:-/tmp/tflrt/bin/python}
OUT=${OUT:-benchmarks/results}
N=50; [ "${QUICK:-0}" = 1 ] && N=10
IMG=(); APP_IMG=()
if [ -n "${IMAGES:-}" ]; then
  IMG=(--images "$IMAGES")
  APP_IMG=(--image "$(find "$IMAGES" -type f \( -iname '*.jpg' -o -iname '*.png' \) | sort | head -1)")
fi

step() { echo; echo "=== $*" >&2; }

# 0. Tables owned by the training / convert / data scripts (they have their own READMEs).
for own in taleqani_zoo parity_table synth_throughput; do
  [ -f "benchmarks/$own.py" ] && echo "note: benchmarks/$own.py is run separately (see benchmarks/README.md)" >&2
done

# 1. Model zoo: convert every run (float32 + int8) unless on the device, then size + int8 latency.
step "zoo_latency"
if [ "${DEVICE:-0}" = 1 ]; then
  "$PYTHON" benchmarks/zoo_latency.py --out-dir "$OUT" --bundles "$BUNDLES" --runs "$N" "${IMG[@]}"
else
  "$PYTHON" benchmarks/zoo_latency.py --out-dir "$OUT" --from-runs "$RUNS" --bundles "$BUNDLES" --runs "$N" "${IMG[@]}"
fi

# The reference int8 bundle the remaining steps use.
REF=$("$PYTHON" - "$BUNDLES" <<'PY'
import json, sys
from pathlib import Path
hits = [p.parent for p in sorted(Path(sys.argv[1]).rglob("bundle.json"))
        if json.loads(p.read_text()).get("quantize") == "int8"]
ref = [h for h in hits if json.loads((h / "bundle.json").read_text())["model"]["name"] == "mobilenetv2-1.0"]
print((ref or hits)[0])
PY
)
echo "reference bundle: $REF" >&2

# 2. Quantisation modes of one run.
step "quant_modes"
if [ "${DEVICE:-0}" = 1 ]; then
  "$PYTHON" benchmarks/quant_modes.py --out-dir "$OUT" --bundles "$WORK/quant" --runs "$N" "${IMG[@]}"
else
  if [ -z "${QUANT_RUN:-}" ]; then
    name=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['model']['run'])" "$REF/bundle.json")
    QUANT_RUN=$(for d in $RUNS; do [ "$(basename "$d")" = "$name" ] && echo "$d"; done | head -1)
  fi
  "$PYTHON" benchmarks/quant_modes.py --out-dir "$OUT" --run "${QUANT_RUN:?no run dir for the reference bundle among $RUNS}" \
      --bundles "$WORK/quant" --runs "$N" "${IMG[@]}"
fi

# 3. Runtimes (second environment optional; reported as unavailable when missing).
step "runtimes"
"$PYTHON" benchmarks/runtimes.py --out-dir "$OUT" --bundle "$REF" --python "tflite-runtime=$TFLRT_PYTHON" --runs $((N + 10)) "${IMG[@]}"

# 4. The app under 1 and 4 clients.
step "app_load"
"$PYTHON" benchmarks/app_load.py --out-dir "$OUT" --bundle "$REF" --requests "$N" "${APP_IMG[@]}"

# 5. Pareto plot from the zoo table.
step "pareto"
"$PYTHON" benchmarks/pareto.py --zoo "$OUT/zoo_latency.json" --out-dir "$OUT"

echo "done: $(ls "$OUT")" >&2
