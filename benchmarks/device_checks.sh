#!/usr/bin/env bash
# The GPU checks of issue #6 as one prepared script for a lent GPU machine (docs/KERNELS.md, "Running the GPU checks"):
#   bash benchmarks/device_checks.sh kernels   # CUDA kernel tests + bench_linear (about 4 min on an H100)
#   bash benchmarks/device_checks.sh e2e       # bench_e2e PixArt-Σ and FLUX (about 3 min)
#   bash benchmarks/device_checks.sh all
#   bash benchmarks/device_checks.sh compile   # bench_e2e PixArt-Σ with torch.compile: BF16 vs W4A4 format C (~3 min)
# Every step is time-boxed and writes its log and JSON under $OUT (default benchmarks/results/gpu_run),
# so a step that runs out of time still leaves what it measured. Packages the GPU image lacks
# (diffusers) are installed from wheels in .whl/ when that folder exists.
set -u
stage="${1:-all}"
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__,
'diffusers', diffusers.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/device.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version,memory.total \
    --format=csv >>"$OUT/device.txt" 2>&1

if [[ "$stage" == kernels || "$stage" == all ]]; then
    echo "== pytest -m cuda"
    # fixed kernel configs (no autotuning) keep the correctness tests short; SIGINT on timeout makes
    # pytest still print its failure report
    DIROTQ_NO_AUTOTUNE=1 timeout -s INT "${PYTEST_S:-75}" python3 -m pytest tests/test_kernels.py -m cuda -q -rfE \
        --tb=short -p no:cacheprovider >"$OUT/pytest_cuda.log" 2>&1
    echo "pytest exit $?" | tee -a "$OUT/pytest_cuda.log"
    tail -25 "$OUT/pytest_cuda.log"
    echo "== bench_linear"
    timeout "${LINEAR_HARD_S:-170}" python3 -m benchmarks.bench_linear --core --budget-s "${LINEAR_S:-120}" \
        --tokens 4096 16 1024 --out "$OUT/bench_linear.json" \
        >"$OUT/bench_linear.log" 2>&1
    echo "bench_linear exit $?" | tee -a "$OUT/bench_linear.log"
    grep -v '^  {' "$OUT/bench_linear.log" | tail -5
    python3 -m benchmarks.summarize_gpu "$OUT/bench_linear.json"
fi

if [[ "$stage" == e2e || "$stage" == all ]]; then
    for model in pixart flux; do
        echo "== bench_e2e $model"
        limit=$([[ $model == pixart ]] && echo "${PIXART_S:-70}" || echo "${FLUX_S:-110}")
        timeout "$limit" python3 -m benchmarks.bench_e2e --model "$model" --out "$OUT/bench_e2e_$model.json" \
            >>"$OUT/bench_e2e.log" 2>&1
        echo "bench_e2e $model exit $?" | tee -a "$OUT/bench_e2e.log"
    done
    grep -v '^  {' "$OUT/bench_e2e.log" | tail -8
    python3 -m benchmarks.summarize_gpu "$OUT"/bench_e2e_*.json
fi

if [[ "$stage" == compile ]]; then
    echo "== bench_e2e pixart --compile default"
    timeout "${COMPILE_S:-200}" python3 -m benchmarks.bench_e2e --model pixart --formats int_ratio --no-graphs \
        --compile default --out "$OUT/bench_e2e_pixart_compiled.json" >>"$OUT/bench_e2e_compiled.log" 2>&1
    echo "bench_e2e compiled exit $?" | tee -a "$OUT/bench_e2e_compiled.log"
    grep -v '^  {' "$OUT/bench_e2e_compiled.log" | tail -8
fi
