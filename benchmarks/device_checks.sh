#!/usr/bin/env bash
# The GPU checks of issue #6 as one prepared script for a lent GPU machine (docs/KERNELS.md, "Running the GPU checks"):
#   bash benchmarks/device_checks.sh kernels   # CUDA kernel tests + bench_linear (about 4 min on an H100)
#   bash benchmarks/device_checks.sh e2e       # bench_e2e PixArt-Σ then FLUX: BF16, W4A4 format C, torchao FP8,
#                                              #   W4A16 format C (+ format A on PixArt), at most 2 + 3.5 min
#   bash benchmarks/device_checks.sh compile   # bench_e2e PixArt-Σ under torch.compile: BF16, W4A4 format C,
#                                              #   torchao FP8, W4A16 format C (at most 5 min)
#   bash benchmarks/device_checks.sh all       # kernels + e2e (over one 10-minute device call: run them apart)
# Through the device tool: run(command="bash benchmarks/device_checks.sh e2e", carry=[".whl"]).
# Every step is time-boxed (PYTEST_S, EXPLORER_S, LINEAR_S, PIXART_S, FLUX_S, COMPILE_S seconds) and writes its JSON
# under $OUT (default benchmarks/results/gpu_run) after every row or variant and its log to the one $OUT/run.log (the
# device tool brings back at most 8 files), so a step that runs out of time still leaves what it measured;
# the variants run in order of interest (format C and the FP8 baseline first). COMPILE_MODE (default "default";
# max-autotune-no-cudagraphs autotunes every GEMM shape of every variant: minutes each) and COMPILE_MODELS
# (default pixart; "pixart flux" adds FLUX) tune the compile stage. Packages the GPU image lacks (diffusers,
# torchao for the fp8-torchao baseline) are installed from wheels in .whl/ (ignored by git: carry it) when that
# folder exists; without torchao the FP8 entries say "skipped" with the reason and the rest runs. LINEAR_ARGS
# replaces bench_linear's shape/variant selection (default: the core variants, 4096 then 16 then 1024 tokens);
# FLUX_ARGS adds bench_e2e arguments for FLUX (a shallower model with the same blocks, when time is short).
set -u
stage="${1:-all}"
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__,
'diffusers', diffusers.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | grep -v "^Failed to load\|_pytree" \
    | tee -a "$LOG"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version,memory.total \
    --format=csv >>"$LOG" 2>&1

if [[ "$stage" == kernels || "$stage" == all ]]; then
    echo "== pytest -m cuda" | tee -a "$LOG"
    # fixed kernel configs (no autotuning) keep the correctness tests short; SIGINT on timeout makes
    # pytest still print its failure report
    DIROTQ_NO_AUTOTUNE=1 timeout -s INT "${PYTEST_S:-120}" python3 -m pytest tests/test_kernels.py -m cuda -q -rfE \
        --tb=short -p no:cacheprovider >/tmp/pytest_cuda.log 2>&1
    echo "pytest exit $?" >>/tmp/pytest_cuda.log
    cat /tmp/pytest_cuda.log >>"$LOG"
    grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" /tmp/pytest_cuda.log | tail -15
    echo "== explorer generate path (analysis.session on the GPU: backend line and PSNR)" | tee -a "$LOG"
    timeout "${EXPLORER_S:-90}" python3 -m benchmarks.explorer_gpu_check --device cuda --out "$OUT/explorer_gpu.json" \
        >>"$LOG" 2>&1
    echo "explorer_gpu_check exit $?" | tee -a "$LOG"
    echo "== bench_linear" | tee -a "$LOG"
    # shellcheck disable=SC2086  # LINEAR_ARGS is a word list
    timeout "${LINEAR_HARD_S:-170}" python3 -m benchmarks.bench_linear --budget-s "${LINEAR_S:-120}" \
        ${LINEAR_ARGS:---core --tokens 4096 16 1024} --out "$OUT/bench_linear.json" >>"$LOG" 2>&1
    echo "bench_linear exit $?" | tee -a "$LOG"
    python3 -m benchmarks.summarize_gpu --table="${LINEAR_TABLE:-both}" "$OUT/bench_linear.json"
fi

if [[ "$stage" == e2e || "$stage" == all ]]; then
    for model in ${E2E_MODELS:-pixart flux}; do
        echo "== bench_e2e $model" | tee -a "$LOG"
        if [[ $model == pixart ]]; then
            limit="${PIXART_S:-120}" formats=(int_ratio-fused int_ratio-fused-gluon fp8-torchao int_ratio
                                              int_ratio-fused-1launch-gluon w4a16-int_ratio int_ratio-fused-1launch-tm)
        else  # format A on FLUX was measured on 2026-11-26 (results/gpu_h100_2026-11-26) and is slower than C
            limit="${FLUX_S:-210}" formats=(int_ratio-fused int_ratio-fused-gluon fp8-torchao int_ratio
                                            int_ratio-fused-1launch-gluon w4a16-int_ratio)
        fi
        extra=()
        # shellcheck disable=SC2206  # FLUX_ARGS is a word list, e.g. "--flux-double-blocks 5 --flux-single-blocks 10"
        [[ $model == flux ]] && extra=(${FLUX_ARGS:-})
        timeout "$limit" python3 -m benchmarks.bench_e2e --model "$model" --formats "${formats[@]}" "${extra[@]}" \
            --out "$OUT/bench_e2e_$model.json" >>"$LOG" 2>&1
        echo "bench_e2e $model exit $?" | tee -a "$LOG"
    done
    python3 -m benchmarks.summarize_gpu "$OUT"/bench_e2e_*.json
fi

if [[ "$stage" == compile ]]; then
    for model in ${COMPILE_MODELS:-pixart}; do
        echo "== bench_e2e $model --compile ${COMPILE_MODE:-default}" | tee -a "$LOG"
        timeout "${COMPILE_S:-300}" python3 -m benchmarks.bench_e2e --model "$model" --no-graphs \
            --formats int_ratio-fused int_ratio-fused-gluon fp8-torchao w4a16-int_ratio --compile "${COMPILE_MODE:-default}" \
            --out "$OUT/bench_e2e_${model}_compiled.json" >>"$LOG" 2>&1
        echo "bench_e2e $model compiled exit $?" | tee -a "$LOG"
    done
    python3 -m benchmarks.summarize_gpu "$OUT"/bench_e2e_*_compiled.json
fi
