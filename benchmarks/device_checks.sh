#!/usr/bin/env bash
# The GPU checks as one prepared script for a lent GPU machine (docs/KERNELS.md, "Running the GPU checks").
# The argument names steps, or groups of them, run in the order given:
#   tests     CUDA kernel and CUDA-graph tests (pytest -m cuda; PYTEST_K selects with pytest's -k)
#   explorer  the explorer's Generate path on the GPU, eager then with CUDA graphs (benchmarks/explorer_gpu_check.py)
#   linear    bench_linear (LINEAR_ARGS: its shape/variant selection; default the core variants at 4096, 16, 1024
#             tokens) and its tables
#   tma       the TMA-fed Gluon GEMMs (plain and warp-specialized): their CUDA tests first (TMA_TEST_S: a barrier that never completes hangs,
#             so this box is short), then bench_linear on FLUX's wide layers at 4096 tokens: Triton, Gluon and
#             TMA GEMMs on packed and cached int8 weights, and our own int8 ceiling at 8192³ (TMA_S)
#   act       bench_act_quant: the activation kernel's passes, tile configs and stages (ACT_ARGS)
#   host      bench_host_overhead on the GPU: host time per layer call, real launchers, one token (HOST_S)
#   e2e       bench_e2e PixArt-Σ then FLUX (E2E_MODELS; FLUX_ARGS, e.g. a shallower FLUX when time is short;
#             CONDITIONING, default w8a16: the conditioning linears outside the blocks at 8-bit weights, 16bit as before)
#   compile   bench_e2e under torch.compile: BF16, W4A4 format C fused, torchao FP8, W4A16 (COMPILE_MODELS, default
#             pixart; COMPILE_MODE, default "default"; COMPILE_SCOPE, default "blocks": each repeated block compiled,
#             one compile per block type, or "model"; FLUX_ARGS applies to FLUX here too)
#   kernels = tests explorer linear (about 4 min on an H100); all = kernels e2e (over one 10-minute device call)
# e.g. bash benchmarks/device_checks.sh kernels;  bash benchmarks/device_checks.sh "tests act linear"
# Through the device tool: run(command="bash benchmarks/device_checks.sh e2e", carry=[".whl"]).
# Every step is time-boxed (PYTEST_S, EXPLORER_S, LINEAR_S/LINEAR_HARD_S, ACT_S, PIXART_S, FLUX_S, COMPILE_S
# seconds) and writes its JSON under $OUT (default benchmarks/results/gpu_run) after every row or variant and its log
# to the one $OUT/run.log (the device tool brings back at most 8 files), so a step that runs out of time still
# leaves what it measured; the variants run in order of interest. Packages the GPU image lacks (diffusers, torchao
# for the fp8-torchao baseline) are installed from wheels in .whl/ (ignored by git: carry it) when that folder
# exists; without torchao the FP8 entries say "skipped" with the reason and the rest runs.
set -u
steps="${1:-all}"
steps="${steps//kernels/tests explorer linear}"
steps="${steps//all/tests explorer linear e2e}"
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

run_cuda_tests() {  # SECONDS [K-FILTER [LABEL]]: the CUDA kernel tests, time-boxed; returns pytest's exit status
    local log="/tmp/pytest_cuda${3:+_$3}.log"
    # fixed kernel configs (no autotuning) keep the correctness tests short; SIGINT on timeout makes
    # pytest still print its failure report
    # -k: a kernel that hangs on the GPU ignores SIGINT; kill it 10 s later so the call goes on
    DIROTQ_NO_AUTOTUNE=1 timeout -s INT -k 10 "$1" python3 -m pytest tests/test_kernels.py tests/test_cuda_graphs.py -m cuda -q -rfE \
        --tb=short -p no:cacheprovider ${2:+-k "$2"} >"$log" 2>&1
    local rc=$?
    echo "pytest ${3:+$3 }exit $rc" >>"$log"
    cat "$log" >>"$LOG"
    grep -E "^(FAILED|ERROR)|passed|failed|pytest ${3:+$3 }exit" "$log" | tail -15
    return $rc
}

step_tests() {
    # the TMA-fed GEMMs' tests ran in the tma step of this call already (and may hang): leave them out here
    if [[ -n ${TMA_RAN:-} && -z ${PYTEST_K:-} ]]; then PYTEST_K="not tma_gemms"; fi
    echo "== pytest -m cuda ${PYTEST_K:+-k \"$PYTEST_K\"}" | tee -a "$LOG"
    run_cuda_tests "${PYTEST_S:-120}" "${PYTEST_K:-}"
}

step_explorer() {
    echo "== explorer generate path (analysis.session on the GPU: backend line and PSNR; then with CUDA graphs)" \
        | tee -a "$LOG"
    # EXPLORER_GRAPHS=0 leaves out the two generations with --cuda-graphs (the JSON is written after every stage)
    timeout -k 10 "${EXPLORER_S:-90}" python3 -m benchmarks.explorer_gpu_check --device cuda --out "$OUT/explorer_gpu.json" \
        $([[ ${EXPLORER_GRAPHS:-1} == 1 ]] && echo --cuda-graphs) >>"$LOG" 2>&1
    echo "explorer_gpu_check exit $?" | tee -a "$LOG"
}

step_linear() {
    echo "== bench_linear" | tee -a "$LOG"
    # shellcheck disable=SC2086  # LINEAR_ARGS is a word list
    timeout -k 10 "${LINEAR_HARD_S:-170}" python3 -m benchmarks.bench_linear --budget-s "${LINEAR_S:-120}" \
        ${LINEAR_ARGS:---core --tokens 4096 16 1024} --out "$OUT/bench_linear.json" >>"$LOG" 2>&1
    echo "bench_linear exit $?" | tee -a "$LOG"
    python3 -m benchmarks.summarize_gpu --table="${LINEAR_TABLE:-both}" "$OUT/bench_linear.json"
}

step_tma() {
    TMA_RAN=1
    echo "== pytest -m cuda -k tma_gemms (the TMA-fed GEMM and its warp-specialized form)" | tee -a "$LOG"
    run_cuda_tests "${TMA_TEST_S:-60}" tma_gemms tma
    tests_rc=$?
    echo "== bench_linear (TMA)" | tee -a "$LOG"
    variants=(C_dirotq-lr_r32 C_dirotq-lr_r32_w8 C_dirotq-lr_r32_tma C_dirotq-lr_r32_ws C_dirotq-lr_r32_w8_tma)
    extra=()
    if [[ $tests_rc == 124 ]]; then  # the tests ran out of time: a TMA kernel may hang; time the others only
        echo "TMA tests timed out: bench_linear without the TMA kernel" | tee -a "$LOG"
        variants=(C_dirotq-lr_r32_w8) extra=(--no-own-ceiling --no-tma)
    fi
    # the widest layers first; no new shape starts in the last 40 s of the box
    timeout -k 10 "${TMA_S:-150}" python3 -m benchmarks.bench_linear --tokens 4096 --models flux --no-first-gluon \
        --budget-s $(( ${TMA_S:-150} - 40 )) --layers ff_up single_proj_mlp+qkv_fused ff_down attn_to_q/k/v/out \
        --variants "${variants[@]}" "${extra[@]}" --out "$OUT/bench_linear_tma.json" >>"$LOG" 2>&1
    echo "bench_linear tma exit $?" | tee -a "$LOG"
    python3 -m benchmarks.summarize_gpu --table=speed "$OUT/bench_linear_tma.json"
    python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['ceilings_measured']))" \
        "$OUT/bench_linear_tma.json"
}

step_act() {
    echo "== bench_act_quant" | tee -a "$LOG"
    # shellcheck disable=SC2086  # ACT_ARGS is a word list
    timeout -k 10 "${ACT_S:-150}" python3 -m benchmarks.bench_act_quant ${ACT_ARGS:-} --out "$OUT/bench_act_quant.json" \
        >/tmp/act.log 2>&1
    echo "bench_act_quant exit $?" >>/tmp/act.log
    cat /tmp/act.log >>"$LOG"
    grep -E "^\||exit" /tmp/act.log
}

step_host() {
    echo "== bench_host_overhead --device cuda" | tee -a "$LOG"
    timeout -k 10 "${HOST_S:-60}" python3 -m benchmarks.bench_host_overhead --device cuda --calls 500 \
        --out "$OUT/host_overhead_gpu.json" >>"$LOG" 2>&1
    echo "bench_host_overhead exit $?" | tee -a "$LOG"
    [[ -f "$OUT/host_overhead_gpu.json" ]] && python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))['rows']]" \
        "$OUT/host_overhead_gpu.json"
}

step_e2e() {
    for model in ${E2E_MODELS:-pixart flux}; do
        echo "== bench_e2e $model" | tee -a "$LOG"
        if [[ $model == pixart ]]; then
            limit="${PIXART_S:-120}" formats=(int_ratio-fused int_ratio-fused-tma fp8-torchao int_ratio
                                              int_ratio-fused-gluon w4a16-int_ratio int_ratio-fused-1launch-tm)
        else
            limit="${FLUX_S:-210}" formats=(int_ratio-fused int_ratio-fused-tma fp8-torchao int_ratio
                                            int_ratio-fused-gluon w4a16-int_ratio)
        fi
        extra=()
        # shellcheck disable=SC2206  # FLUX_ARGS is a word list, e.g. "--flux-double-blocks 5 --flux-single-blocks 10"
        [[ $model == flux ]] && extra=(${FLUX_ARGS:-})
        timeout -k 10 "$limit" python3 -m benchmarks.bench_e2e --model "$model" --formats "${formats[@]}" "${extra[@]}" \
            --conditioning "${CONDITIONING:-w8a16}" --out "$OUT/bench_e2e_$model.json" >>"$LOG" 2>&1
        echo "bench_e2e $model exit $?" | tee -a "$LOG"
    done
    for model in ${E2E_MODELS:-pixart flux}; do
        [[ -f "$OUT/bench_e2e_$model.json" ]] && python3 -m benchmarks.summarize_gpu "$OUT/bench_e2e_$model.json"
    done
}

step_compile() {
    for model in ${COMPILE_MODELS:-pixart}; do
        echo "== bench_e2e $model --compile ${COMPILE_MODE:-default}" | tee -a "$LOG"
        extra=()
        # shellcheck disable=SC2206  # FLUX_ARGS is a word list
        [[ $model == flux ]] && extra=(${FLUX_ARGS:-})
        timeout -k 10 "${COMPILE_S:-300}" python3 -m benchmarks.bench_e2e --model "$model" --no-graphs "${extra[@]}" \
            --formats int_ratio-fused fp8-torchao w4a16-int_ratio --compile "${COMPILE_MODE:-default}" \
            --compile-scope "${COMPILE_SCOPE:-blocks}" --conditioning "${CONDITIONING:-w8a16}" \
            --out "$OUT/bench_e2e_${model}_compiled.json" >>"$LOG" 2>&1
        echo "bench_e2e $model compiled exit $?" | tee -a "$LOG"
        [[ -f "$OUT/bench_e2e_${model}_compiled.json" ]] \
            && python3 -m benchmarks.summarize_gpu "$OUT/bench_e2e_${model}_compiled.json"
    done
}

for step in $steps; do
    case "$step" in
        tests|explorer|linear|tma|act|host|e2e|compile) "step_$step" ;;
        *) echo "unknown step '$step' (tests explorer linear tma act host e2e compile kernels all)"; exit 2 ;;
    esac
done
