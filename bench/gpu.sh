#!/usr/bin/env bash
# A GPU session's checks and timings, in one go (a lent GPU's minutes are few): tests/test_cuda.py, a short
# `sobre speedrun` on the GPU (every stage, scaled down), then bench/engine.py and bench/train.py with --device
# cuda (--compile: Engine(compile=True), compiled training blocks), the engine in bf16, and bench/grpo.py (issue 6's
# GRPO against TRL, both on the GPU: only where trl and datasets import; the lent machines' image has neither: wheels
# found in .whl/ (trl, datasets, dill, multiprocess; `pip download --no-deps ... -d .whl`) go into /tmp/site first).
# On a machine of several GPUs, the speedrun again with every training stage in one torchrun process per GPU
# (speedrun_nproc: FSDP2 pretraining, data-parallel SFT / GRPO / distillation over NCCL).
# Each part has its own time limit; logs go to $OUT (default gpu-logs/). PARTS picks some: PARTS="test_cuda bench_engine".
#   bash bench/gpu.sh
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (the image lacks them), beside its own packages
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
PARTS=${PARTS:-test_cuda speedrun speedrun_nproc bench_engine bench_train bench_engine_bf16 bench_grpo}
part() {  # part NAME SECONDS COMMAND...: run it, its output to $OUT/NAME.log and to the terminal
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
part test_cuda "${LIMIT_TESTS:-180}" $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider --tb=short --durations=8
RUN=$(mktemp -d)  # (the run folder's checkpoints stay out of $OUT)
part speedrun "${LIMIT_SPEEDRUN:-120}" $PY -m sobre speedrun --device cuda --steps 30 --eval-problems 32 --out "$RUN"
cp "$RUN/speedrun.json" "$OUT/" 2>/dev/null
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if (( GPUS > 1 )); then
    RUN_N=$(mktemp -d)
    part speedrun_nproc "${LIMIT_SPEEDRUN_NPROC:-240}" $PY -m sobre speedrun --device cuda --steps 30 \
        --eval-problems 32 --nproc "$GPUS" --out "$RUN_N"
    cp "$RUN_N/report.md" "$OUT/speedrun_nproc.md" 2>/dev/null
elif [[ " $PARTS " == *" speedrun_nproc "* ]]; then
    echo "== speedrun_nproc: skipped (fewer than two GPUs)"
fi
part bench_engine "${LIMIT_ENGINE:-240}" $PY bench/engine.py --device cuda --compile
part bench_train "${LIMIT_TRAIN:-150}" $PY bench/train.py --device cuda --no-scaling --compile
part bench_engine_bf16 "${LIMIT_ENGINE_BF16:-120}" $PY bench/engine.py --device cuda --dtype bfloat16
if $PY -c "import trl, datasets" 2>/dev/null; then
    part bench_grpo "${LIMIT_GRPO:-240}" $PY bench/grpo.py --device cuda --rounds 1
elif [[ " $PARTS " == *" bench_grpo "* ]]; then
    echo "== bench_grpo: skipped (trl or datasets does not import)"
fi
