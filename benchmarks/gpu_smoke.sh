#!/usr/bin/env bash
# GPU smoke test of the training engine: DDP, FSDP2, compiled blocks and bf16, 20 steps each, with a
# tiny synthetic config through `dinocell pretrain`.  For whoever owns a CUDA box (the CI machine has
# none).  Prints a pass/fail table and exits 1 if any case fails.
#
#   bash benchmarks/gpu_smoke.sh                # all GPUs of this node (>= 1)
#   GPUS=2 STEPS=20 DINOCELL=.venv/bin/dinocell OUT=/tmp/smoke bash benchmarks/gpu_smoke.sh
#   ONLY="ddp_bf16 fsdp_bf16" bash benchmarks/gpu_smoke.sh      # a subset of the cases
#   ACCELERATOR=cpu GPUS=2 STEPS=2 ONLY="single_fp32 fsdp_fp32" bash benchmarks/gpu_smoke.sh  # dry run on CPU
#
# A case passes when the command exits 0 and DIR/checkpoints/last.ckpt holds global_step == STEPS with
# finite weights.  Logs: OUT/<case>/log.txt.
set -u

DINOCELL=${DINOCELL:-dinocell}
PYTHON=${PYTHON:-$(dirname "$(command -v "$DINOCELL")")/python}
STEPS=${STEPS:-20}
ACCELERATOR=${ACCELERATOR:-gpu}
OUT=${OUT:-$(mktemp -d -t dinocell_gpu_smoke.XXXXXX)}
if [[ -z "${GPUS:-}" && "$ACCELERATOR" == gpu ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ "${GPUS:-0}" -lt 1 ]]; then
  echo "gpu_smoke: no CUDA GPU found (set GPUS=N to override)" >&2
  exit 2
fi

# Tiny ViT, synthetic data, no tracking, no held-out evaluation: the engine is what is under test.
TINY=(model.embed_dim=64 model.depth=2 model.num_heads=2 model.patch_size=8
      head.prototypes=256 head.hidden_dim=128 head.bottleneck_dim=64
      data.views.global_crop_size=32 data.views.local_crop_size=16 data.views.n_local_crops=2
      data.synthetic.n_fields=512 data.synthetic.size=64 data.batch_size=8 data.num_workers=2
      loss.gram_weight=0.5 track.logger=none train.progress_bar=false train.eval_fields=0
      train.accelerator=$ACCELERATOR train.checkpoint_every_steps=10)

declare -A CASES=(
  [single_fp32]="train.devices=1 train.precision=32"
  [single_bf16]="train.devices=1 train.precision=bf16-mixed"
  [single_compile_bf16]="train.devices=1 train.precision=bf16-mixed train.compile=true"
  [ddp_bf16]="train.strategy=ddp train.devices=$GPUS train.precision=bf16-mixed"
  [fsdp_fp32]="train.strategy=fsdp train.devices=$GPUS train.precision=32"
  [fsdp_bf16]="train.strategy=fsdp train.devices=$GPUS train.precision=bf16-mixed"
  [fsdp_compile_bf16]="train.strategy=fsdp train.devices=$GPUS train.precision=bf16-mixed train.compile=true"
)
# shellcheck disable=SC2206
ORDER=(${ONLY:-single_fp32 single_bf16 single_compile_bf16 ddp_bf16 fsdp_fp32 fsdp_bf16 fsdp_compile_bf16})

check_ckpt() {  # prints the checkpoint's global step, or an error
  "$PYTHON" - "$1" <<'EOF'
import sys, torch
from dinocell.engine.checkpoint import load_checkpoint_file
ck = load_checkpoint_file(sys.argv[1])
finite = all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
print(ck["global_step"] if finite else "non-finite weights")
EOF
}

declare -A RESULT TIME
failed=0
for name in "${ORDER[@]}"; do
  if [[ -z "${CASES[$name]+set}" ]]; then
    echo "gpu_smoke: unknown case '$name' (known: ${!CASES[*]})" >&2
    exit 2
  fi
done
for name in "${ORDER[@]}"; do
  dir="$OUT/$name"
  mkdir -p "$dir"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$DINOCELL" pretrain --output-dir "$dir" --max-steps "$STEPS" --no-resume "${TINY[@]}" ${CASES[$name]} \
      >"$dir/log.txt" 2>&1
  rc=$?
  TIME[$name]=$(( $(date +%s) - start ))
  if [[ $rc -ne 0 ]]; then
    RESULT[$name]="FAIL (exit $rc: $(grep -v '^\s*$' "$dir/log.txt" | tail -n 1 | cut -c1-80))"
    failed=1
    continue
  fi
  step=$(check_ckpt "$dir/checkpoints/last.ckpt" 2>&1 | tail -n 1)
  if [[ "$step" == "$STEPS" ]]; then
    RESULT[$name]="pass"
  else
    RESULT[$name]="FAIL (last.ckpt: $step)"
    failed=1
  fi
done

printf '\n%-22s %-6s %s\n' case time result
printf '%s\n' "------------------------------------------------------------"
for name in "${ORDER[@]}"; do
  printf '%-22s %4ss  %s\n' "$name" "${TIME[$name]}" "${RESULT[$name]}"
done
echo "gpus=$GPUS steps=$STEPS logs=$OUT"
exit $failed
