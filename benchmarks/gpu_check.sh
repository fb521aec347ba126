#!/usr/bin/env bash
# One GPU check, no downloads, about 8 minutes on one GPU:
#
#   benchmarks/gpu_check.sh              # on a machine with CUDA
#   benchmarks/gpu_check.sh --cpu-only   # its CPU parts, on any machine
#
# 1. environment: torch, CUDA, the GPUs (nvidia-smi when present);
# 2. the test suite's CUDA-capable tests with --device cuda (tests/test_device.py: the tiny
#    families' chain -- tiny-random, class LDM, SD with CLIP prompts, DiT -- calibrated,
#    finetuned with activation checkpointing, merged and sampled on the GPU against the CPU; the
#    integer runtime's torch._int_mm path on CUDA against the fake-quantized model, bit for bit;
#    a bf16 teacher), and the torchrun data-parallel tests (gloo, tests/distributed);
# 3. benchmarks/paper_scale.py --device cuda on LDM-4 and SD v1.4 (random weights, real
#    configs), then SD's distillation step at batch 8 with activation checkpointing and a bf16
#    teacher (the memory options);
# 4. with more than one GPU: torchrun sample, calibrate and finetune over nccl against one process.
#
# --cpu-only runs 2's device tests (they skip without a GPU; the test suite runs the gloo tests)
# and 4 over gloo with two CPU processes; 3 is skipped (run `python benchmarks/paper_scale.py --quick` for the
# CPU figures). Logs and a summary go to benchmarks/results/gpu_check/ (GPU_CHECK_OUT to change).
set -uo pipefail
cd "$(dirname "$0")/.."
CPU_ONLY=0
case "${1:-}" in
  --cpu-only) CPU_ONLY=1 ;;
  "") ;;
  -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
  *) echo "error: unknown option ${1} (use --cpu-only or nothing)" >&2; exit 2 ;;
esac
# time limits are sized for a GPU machine's CPUs; --cpu-only on a small shared machine gets 6x
LIMIT_SCALE=1; [[ $CPU_ONLY -eq 1 ]] && LIMIT_SCALE=6
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="${PYTHONPATH:-$(pwd)}"
PY="${PYTHON:-python}"
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, one summary line
  local name="$1" limit=$(( $2 * LIMIT_SCALE )); shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [[ $rc -ne 0 ]] && { status="FAILED (rc $rc)"; FAILED=1; }
  printf '%-22s %-16s %4ds  %s\n' "$name" "$status" $((SECONDS - t0)) "$OUT/$name.log" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$name.log"
}

NGPU=0
if [[ $CPU_ONLY -eq 0 ]]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [[ "$NGPU" -lt 1 ]]; then
    echo "error: this PyTorch sees no CUDA device: run with --cpu-only" >&2
    exit 2
  fi
fi
DEV=cuda; [[ $CPU_ONLY -eq 1 ]] && DEV=cpu

step environment 60 "$PY" -c "
import platform, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('cpu', platform.processor(), 'capability', torch.backends.cpu.get_cpu_capability())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm {p.major}{p.minor}')
"
command -v nvidia-smi > /dev/null && [[ $CPU_ONLY -eq 0 ]] && nvidia-smi >> "$OUT/environment.log" 2>&1

step device_tests 240 "$PY" -m pytest -q -rs tests/test_device.py --device "$DEV" -p no:cacheprovider
if [[ $CPU_ONLY -eq 0 ]]; then  # on a CPU-only machine the test suite runs these anyway
  step distributed_tests 300 "$PY" -m pytest -q tests/distributed -p no:cacheprovider
fi

if [[ $CPU_ONLY -eq 0 ]]; then
  step paper_scale 300 "$PY" benchmarks/paper_scale.py --device cuda --models ldm-4,sd-v1-4 --steps 3 \
    --out "$OUT/paper_scale_cuda.json"
  step sd_memory_options 180 "$PY" benchmarks/paper_scale.py --device cuda --models sd-v1-4 --phases distill \
    --batches 8 --steps 3 --grad-checkpoint --teacher-dtype bf16 --out "$OUT/paper_scale_cuda_sd_memory.json"
else
  echo "== paper_scale: skipped with --cpu-only (python benchmarks/paper_scale.py --quick gives the CPU figures)" \
    | tee -a "$SUMMARY"
fi

# data parallel: the same commands over 2 processes (nccl on 2+ GPUs, gloo on the CPU) against one process
if [[ $CPU_ONLY -eq 1 || "$NGPU" -ge 2 ]]; then
  NPROC=2
  TR="$(mktemp -d "${TMPDIR:-/tmp}/lowbitdm-gpu-check.XXXXXX")"  # artifacts: not kept
  S=(--set sample.num_samples=8 --set sample.batch_size=2 --set sample.steps=4 --set calibrate.num_samples=6
     --set calibrate.batch_size=2 --set finetune.epochs=2 --set finetune.batch_size=4 --set finetune.micro_batch=2
     --set finetune.steps=3)
  # torchrun gives each worker one thread (OMP_NUM_THREADS=1); on the CPU float kernels depend on the thread
  # count, so the one-process run gets one thread too
  step torchrun_one 300 bash -c "OMP_NUM_THREADS=1 $PY -m lowbitdm_cli calibrate --model tiny-random --bits w4a8 ${S[*]} \
      --device $DEV --out $TR/one/calibrate && OMP_NUM_THREADS=1 $PY -m lowbitdm_cli finetune $TR/one/calibrate --method qalora \
      --device $DEV --out $TR/one/finetune && OMP_NUM_THREADS=1 $PY -m lowbitdm_cli sample $TR/one/finetune --device $DEV \
      --out $TR/one/sample"
  step torchrun_two 300 bash -c "$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC -m lowbitdm_cli \
      calibrate --model tiny-random --bits w4a8 ${S[*]} --device $DEV --out $TR/two/calibrate && \
      $PY -m torch.distributed.run --standalone --nproc_per_node $NPROC -m lowbitdm_cli finetune $TR/two/calibrate \
      --method qalora --device $DEV --out $TR/two/finetune && \
      $PY -m torch.distributed.run --standalone --nproc_per_node $NPROC -m lowbitdm_cli sample $TR/two/finetune \
      --device $DEV --out $TR/two/sample"
  step torchrun_compare 60 "$PY" -c "
import sys, torch
from safetensors.torch import load_file
tr = sys.argv[1]
one, two = (load_file(f'{tr}/{n}/calibrate/calib_data.safetensors') for n in ('one', 'two'))
diff = max((one[k].double() - two[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
assert all(torch.equal(one[k], two[k]) for k in one), f'calibration trajectories differ (max abs {diff:.3g})'
qa, qb = (load_file(f'{tr}/{n}/calibrate/quant_state.safetensors') for n in ('one', 'two'))
print('calibrate: trajectories identical; quant state identical:', all(torch.equal(qa[k], qb[k]) for k in qa))
fa, fb = (load_file(f'{tr}/{n}/finetune/quant_state.safetensors') for n in ('one', 'two'))
la, lb = (load_file(f'{tr}/{n}/finetune/loss_curve.safetensors')['step_loss'] for n in ('one', 'two'))
print('finetune: step losses', la.tolist(), lb.tolist())
differ = [k for k in fa if not torch.equal(fa[k], fb[k])]
print(f'finetune: {len(fa) - len(differ)} of {len(fa)} tensors identical, step losses identical: {torch.equal(la, lb)}')
# micro-batches summed in index order on every rank: the same bits for any process count
assert not differ and torch.equal(la, lb), f'finetune differs from one process in {differ[:3]}'
import numpy as np
from lowbitdm_cli.npz import read_npz
a, b = (read_npz(f'{tr}/{n}/sample/samples.npz')['arr_0'].astype(int) for n in ('one', 'two'))
print(f'sample: {(np.abs(a - b) <= 1).mean():.2%} of pixels within one grey level')
" "$TR"
else
  echo "== torchrun over nccl: skipped (one GPU)" | tee -a "$SUMMARY"
fi

echo
echo "summary ($SUMMARY):"
cat "$SUMMARY"
exit $FAILED
