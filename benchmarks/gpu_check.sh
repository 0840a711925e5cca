#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the CUDA tests, the core test files on the
# GPU machine (their default device is then the GPU), and the GPU benchmark figures.
# Needs torch, torchvision, pandas, pyyaml, scikit-learn, tqdm and pytest; not Ray/Optuna.
#
#   bash benchmarks/gpu_check.sh [LOGDIR]      # logs in LOGDIR (default gpu_check_logs)
set -u
cd "$(dirname "$0")/.."
log=${1:-gpu_check_logs}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log/gpu.txt"
$py -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__)" | tee -a "$log/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t=$SECONDS
  timeout "$limit" "$@" >"$log/$name.txt" 2>&1; local rc=$?
  tail -n "${TAIL:-6}" "$log/$name.txt"; echo "== $name: exit $rc in $((SECONDS - t)) s"; }
TAIL=8 step cuda_tests 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
step sketch_speed_cuda 100 $py benchmarks/sketch_speed.py --device cuda
TAIL=9 step train_throughput_cuda 170 $py benchmarks/train_throughput.py --device cuda --workers 8
TAIL=12 step core_tests_on_gpu_machine "${CORE_LIMIT:-200}" $py -m pytest -q -p no:cacheprovider \
  tests/test_modes.py tests/test_train.py tests/test_cli_train.py tests/test_prune.py \
  tests/test_sketch_math.py tests/test_checkpoint.py tests/test_data.py tests/test_rates.py \
  tests/test_imagenet_models.py
