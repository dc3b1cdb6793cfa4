#!/usr/bin/env bash
# One DiT training stage of the embedded model on a lent CUDA machine (the `device` tool), inside a fixed
# wall-clock budget: the lease is short, so the step count is chosen from a measured speed rather than guessed.
#
#   1. installs the carried wheels (.whl: diffusers and what it needs beyond the machine's image);
#   2. a 80-step probe builds the latent pool (cached for step 3) and measures seconds per step;
#   3. trains from $INIT for as many steps as fit in what is left of $TOTAL_S (the step count is written to
#      train_state.json, so the stage can be repeated exactly with STEPS=N);
#   4. packs the EMA transformer and text encoder (fp16, as the pipeline ships them) into $OUT as two tars,
#      with the loss logs. The VAE, tokenizer and scheduler are unchanged, so they are not sent back.
#
# Run it through the device tool from the repository root, e.g.
#   run(command="TOTAL_S=540 bash scripts/device_train_stage.sh", carry=[".whl"], timeout_s=595)
# STEPS=N skips the probe and trains exactly N steps (still stopped by the budget);
# INIT=runs/x needs carry=[".whl", "runs/x"].
set -euo pipefail
: "${OUT:?OUT must name the folder that comes back}"
INIT=${INIT:-assets/tiny-pixart}
TOTAL_S=${TOTAL_S:-500}      # wall-clock budget of the whole script, setup included
SEED=${SEED:-10}
BATCH=${BATCH:-128}
POOL=${POOL:-20000}
LR=${LR:-3e-4}
start=$(date +%s)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
{ nvidia-smi -L || echo "no nvidia-smi"; } | tee "$OUT/run.log"
python3 -c "import torch, diffusers, transformers as tf
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', tf.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/run.log"

common=(--vae "$INIT/vae" --init "$INIT" --minutes 1e9 --seed "$SEED" --threads 8 --hidden 256 --depth 6
        --batch "$BATCH" --lr "$LR" --pool "$POOL" --prediction-type v_prediction --object-weight 3 --t-power 1
        --text-aux-weight 0.3 --save-every-min 1e9)
if [[ -n "${STEPS:-}" ]]; then  # step count known (a repeat, or the speed already measured on this kind)
  steps=$STEPS
  minutes=$(python3 -c "print(($TOTAL_S - $(( $(date +%s) - start )) - 25) / 60)")
else
  probe_start=$(date +%s)
  python3 -m scripts.train_tiny_pixart "${common[@]}" --out /tmp/work/probe --max-steps 80 >> "$OUT/run.log" 2>&1
  probe_end=$(date +%s)
  cp /tmp/work/probe/log.jsonl "$OUT/probe_log.jsonl"
  # seconds per step between logged steps 25 and 75 (after CUDA warm-up); setup = probe wall time − its training
  # time, which includes building the pool (the stage below reads it from the cache: a safe overestimate)
  read -r sps setup <<<"$(python3 - "$probe_start" "$probe_end" <<'PY'
import json, sys
recs = {r["step"]: r["t"] for r in map(json.loads, open("/tmp/work/probe/log.jsonl"))}
wall = int(sys.argv[2]) - int(sys.argv[1])
print((recs[75] - recs[25]) / 50, wall - recs[75])
PY
)"
  left=$(( TOTAL_S - ($(date +%s) - start) ))
  steps=$(python3 -c "print(max(100, int(($left - $setup - 40) / $sps)))")
  echo "probe: $sps s/step, setup ${setup}s; ${left}s left → $steps steps" | tee -a "$OUT/run.log"
  # hard stop a little before the budget even if the speed estimate was optimistic (lr then ends above its floor)
  minutes=$(python3 -c "print(($left - $setup - 25) / 60)")
fi
python3 -m scripts.train_tiny_pixart "${common[@]}" --out /tmp/work/stage --max-steps "$steps" \
    --minutes "$minutes" >> "$OUT/run.log" 2>&1
cp /tmp/work/stage/log.jsonl "$OUT/log.jsonl"
cp /tmp/work/stage/pipeline/train_state.json "$OUT/train_state.json"
tar -C /tmp/work/stage/pipeline -cf "$OUT/transformer.tar" transformer
tar -C /tmp/work/stage/pipeline -cf "$OUT/text_encoder.tar" text_encoder
echo "done in $(( $(date +%s) - start ))s" | tee -a "$OUT/run.log"
