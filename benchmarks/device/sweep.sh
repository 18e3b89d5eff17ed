#!/usr/bin/env bash
# On a GPU machine: unpack the PTB-XL pack, then train several fit.py runs at once on its one GPU (1 CPU thread
# each), each stopped after SECONDS (its last.pt lets `--resume` continue it later), and tar runs and logs to $OUT.
#   bash benchmarks/device/sweep.sh PACK_DIR SECONDS "NAME|FIT ARGS" "NAME|FIT ARGS" ...
# Runs carried back with run_carry.py (a folder CARRIED) are restored first when $CARRIED is set.
set -u
pack=$1; seconds=$2; shift 2
export PYTHONPATH=$PWD MSSSM_CACHE_DIR=/tmp/cache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p /tmp/logs /tmp/runs
nproc --all; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 benchmarks/device/ptbxl_pack.py unpack --pack "$pack" --data-dir /tmp/ptbxl || exit 1
if [ -n "${CARRIED:-}" ]; then python3 benchmarks/device/run_carry.py restore --carried "$CARRIED" --to /tmp/runs || exit 1; fi
data="--task ptbxl --data-dir /tmp/ptbxl --labels /tmp/ptbxl/labels/labels.csv --n-boot 1000"
for spec in "$@"; do
  name=${spec%%|*}; args=${spec#*|}
  timeout "$seconds" python3 training/fit.py $data $args --out /tmp/runs/$name > /tmp/logs/$name.log 2>&1 &
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; uptime
wait
for spec in "$@"; do
  name=${spec%%|*}; echo "== $name"; grep '^{' /tmp/logs/$name.log | tail -2 | cut -c1-300
done
cd /tmp && tar czf "$OUT/runs.tgz" runs logs
