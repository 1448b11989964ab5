#!/usr/bin/env bash
# bash bench/side_by_side.sh [--workload alpaca_zh_demo] [--repeats 3] [--zhlora a,b] [--peer lf_bf16_no_gc]
#
# zhlora and LLaMA-Factory interleaved, one fresh process at a time: zhlora's variants, then
# LLaMA-Factory's, then zhlora's again, --repeats times. The two tools' scripts run separately
# (each in its own venv), so without this a ratio would divide runs made an hour apart, and this
# 2-core VM's speed drifts by more than the differences measured (LLaMA-Factory's best setting
# ran 2.2x faster on 2026-12-01 than on 2026-11-30, zhlora 1.5x).
# The first round replaces the named variants' earlier runs; later rounds add to them (--append),
# so each result file ends with --repeats interleaved runs per variant, and the medians and the
# ratio in bench/results/summary.json (python bench/summarize.py) come from the same hour.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=mixed REPEATS=3 ZHLORA=zhlora_fastest,zhlora_compile PEER=lf_bf16_no_gc
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "side_by_side.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --workload) WORKLOAD=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --zhlora) ZHLORA=$2; shift 2 ;;
    --peer) PEER=$2; shift 2 ;;
    *) echo "side_by_side.sh: unknown flag $1 (--workload, --repeats, --zhlora, --peer)" >&2; exit 2 ;;
  esac
done
[ "$REPEATS" -ge 1 ] 2>/dev/null || { echo "side_by_side.sh: --repeats must be 1 or more" >&2; exit 2; }
PY=${PYTHON:-python}
APPEND=()
for round in $(seq 1 "$REPEATS"); do
  echo "[side_by_side] round $round of $REPEATS: $ZHLORA, then $PEER ($WORKLOAD)"
  "$PY" bench/train_throughput.py --workload "$WORKLOAD" --variants "$ZHLORA" --repeats 1 ${APPEND[@]+"${APPEND[@]}"}
  PYTHON="$PY" bash bench/peer_llamafactory.sh --workload "$WORKLOAD" --variants "$PEER" --repeats 1 ${APPEND[@]+"${APPEND[@]}"}
  APPEND=(--append)
done
