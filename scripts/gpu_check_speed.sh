#!/usr/bin/env bash
# Issue 14 (ptune vs PEFT on CUDA) on a GPU host: scripts/bench.py --device cuda, in one prepared run of < 9 minutes.
#
#   1. here, once (network, after .ci/run built .venv):  bash scripts/gpu_check_speed.sh prepare
#      -> .gpu-bundle/ (../shared/gpu/make-bundle.sh: hydra wheels, minilm, the SmolLM2 tokenizer, data) plus
#         .gpu-bundle/whl-peft/: the bench extra's transformers and peft wheels (pyproject.toml), for the PEFT child
#         when the host's transformers cannot run PEFT's prefix tuning (5.24 and later)
#   2. on the GPU host (the device `run` tool: command "bash scripts/gpu_check_speed.sh run",
#      carry [".gpu-bundle"], timeout_s 600): results land in $OUT (log.txt, tables.md, one JSON per bench run)
#
# Phases, most important first (each time-boxed; a phase is skipped when the time budget is spent, see log.txt):
#   a. minilm-ptv2 (P-tuning v2 on MiniLM vs PEFT prefix tuning), 600 steps x 32, bf16 autocast;
#   b. synthetic-soft on TinyLlama-1.1B's shape (random weights, bf16), soft prompt of 20 tokens, batch 16, 100 steps;
#   c. the same at batch 64.
# The decoder is built once on the GPU (random init) into /tmp and reused by b and c.
#
# A dry run of the same commands on a CPU with tiny settings (after `prepare`):
#   PY=.venv/bin/python DEVICE=cpu SHAPE=tiny STEPS_MINILM=4 STEPS_SYN=4 BATCHES="4 8" THREADS=1 \
#     BENCH_EXTRA="--precision fp32 --matmul-size 256 --ptune-override=dataset.max_eval_samples=32" \
#     SYN_EXTRA="--backbone-dtype float32" LIMIT_MINILM=900 LIMIT_SYN=900 BUDGET=3600 SITE=/tmp/site-dry \
#     OUT=/tmp/gpu-check-speed-dry bash scripts/gpu_check_speed.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
B=.gpu-bundle

if [[ "${1:-}" == "prepare" ]]; then
    PY=${PY:-.venv/bin/python}
    [[ -d $B/minilm && -d $B/smollm2-tokenizer && -d $B/data ]] || bash ../shared/gpu/make-bundle.sh
    # The PEFT child's pair, pure-Python wheels: the newest of the bench extra's range (transformers < 5.24).
    mapfile -t pins < <("$PY" -c "import tomllib
for r in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']: print(r)")
    rm -rf "$B/whl-peft"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$B/whl-peft" "${pins[@]}"
    ls "$B/whl-peft"
    du -sh "$B"
    exit 0
fi
[[ "${1:-}" == "run" ]] || { echo "usage: $0 prepare|run"; exit 2; }
[[ -d $B/minilm && -d $B/smollm2-tokenizer && -d $B/data ]] || { echo "no $B: run '$0 prepare' first"; exit 2; }

OUT=${OUT:-/tmp/gpu-check-speed}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
BUDGET=${BUDGET:-510}  # seconds; a phase that would start later is skipped
phase() {  # phase NAME TIMEOUT_S COMMAND...: run unless the budget is spent; never stops the script; tables -> tables.md
    local name=$1 limit=$2; shift 2
    if (( SECONDS + 30 > BUDGET )); then echo "== $name: SKIPPED (time budget spent at ${SECONDS}s)"; return; fi
    echo "== $name (at ${SECONDS}s)"
    echo "## $name" >> "$OUT/tables.md"
    timeout "$limit" "$@" | tee -a "$OUT/tables.md"
    local rc=$?
    (( rc == 0 )) || echo "== $name: FAILED or timed out (exit $rc)" | tee -a "$OUT/tables.md"
}

PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-tinyllama}
STEPS_MINILM=${STEPS_MINILM:-600}
STEPS_SYN=${STEPS_SYN:-100}
BATCHES=${BATCHES:-"16 64"}
THREADS=${THREADS:-0}
BENCH_EXTRA=${BENCH_EXTRA:-}  # extra bench options for every phase (the CPU dry run's tiny settings)
SYN_EXTRA=${SYN_EXTRA:-}      # extra bench options for the synthetic phases
LIMIT_MINILM=${LIMIT_MINILM:-200}  # each phase's time box, seconds
LIMIT_SYN=${LIMIT_SYN:-150}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "(no nvidia-smi)"
SITE=${SITE:-/tmp/site}
"$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$B"/whl/*.whl
export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false PTUNE_DATA=$PWD/$B/data
"$PY" -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"

# The PEFT child's interpreter: the host's own where PEFT's prefix tuning runs on its transformers, else the same
# python with the bench extra's transformers/peft wheels first on its path (a wrapper script for --peft-python).
PEFT_PY=$(command -v "$PY")
if ! "$PY" scripts/bench.py --check-peft; then
    if compgen -G "$B/whl-peft/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target "$SITE-peft" "$B"/whl-peft/*.whl
        printf '#!/bin/sh\nPYTHONPATH=%s:%s exec %s "$@"\n' "$SITE-peft" "$PYTHONPATH" "$PEFT_PY" > "$SITE-peft.sh"
        chmod +x "$SITE-peft.sh"
        if "$SITE-peft.sh" scripts/bench.py --check-peft; then
            PEFT_PY=$SITE-peft.sh
        else
            echo "== the bundled transformers/peft pair does not run here either: minilm-ptv2's PEFT side will fail"
        fi
    else
        echo "== no $B/whl-peft (prepare downloads it): minilm-ptv2's PEFT side will fail"
    fi
fi
echo "== PEFT child: $PEFT_PY"

# shellcheck disable=SC2206  # BENCH_EXTRA and SYN_EXTRA are word lists on purpose
BENCH=("$PY" scripts/bench.py --device "$DEVICE" --threads "$THREADS" --peft-python "$PEFT_PY" $BENCH_EXTRA)
phase "a. minilm-ptv2, $STEPS_MINILM steps x 32, $DEVICE" "$LIMIT_MINILM" "${BENCH[@]}" --setup minilm-ptv2 \
    --backbone-dir "$PWD/$B/minilm" --steps "$STEPS_MINILM" --batch-size 32 --json "$OUT/minilm_ptv2.json"
# shellcheck disable=SC2206
SYN=(--setup synthetic-soft --shape "$SHAPE" --tokenizer "$PWD/$B/smollm2-tokenizer" --synthetic-dir "/tmp/bench-$SHAPE"
     --steps "$STEPS_SYN" $SYN_EXTRA)
for batch in $BATCHES; do
    phase "b. synthetic-soft $SHAPE, batch $batch x $STEPS_SYN steps, $DEVICE" "$LIMIT_SYN" "${BENCH[@]}" "${SYN[@]}" \
        --batch-size "$batch" --json "$OUT/synthetic_${SHAPE}_b$batch.json"
done
echo "== done at ${SECONDS}s"
