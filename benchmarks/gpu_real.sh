#!/usr/bin/env bash
# The real task on one GPU, in priority order, each step printing its figures and time:
#   (1) the public CIFAR ResNet-56 on the JPEG copy of CIFAR-10: its test accuracy, then
#       the adapted baseline (fine-tuned on the JPEG training images) and its test accuracy;
#   (2) a search with the shipped real-data config (48 trials; through Ray where it is
#       installed, else the Ray-free loop, trials packed 4 to a GPU, the graph step);
#   (3) the search's pick at <= 50% FLOPs and the uniform vector of equal or higher
#       FLOPs, each retrained with the same schedule; test accuracy of each;
#   (4) if time is left, [0.6]*27 with the same schedule.
# Sized for at most 8 minutes on one H100/H200 including what it loads (LIMIT seconds,
# default 480: a step that would start too late is skipped and says so).
#
#   bash benchmarks/gpu_real.sh DATA CKPT [WORK]
#       DATA: the JPEG class folders (train/<class>/*.jpg, test/<class>/*.jpg) or one
#             .tar / .tar.gz / .tgz archive of them; CKPT: the public ResNet-56
#             (resnet56-4bfd9763.th, the original project's layout); WORK: gpu_real_work
#   bash benchmarks/gpu_real.sh --toy [DATA [CKPT]]
#       every step shrunk (a few JPEGs per class, 1 epoch, 4 trials; CPU is fine): a dry
#       run in a few minutes. Without CKPT it pretrains a stand-in for 1 epoch.
#   bash benchmarks/gpu_real.sh pack SRC OUT.tar.gz [TRAIN_PER_CLASS TEST_PER_CLASS]
#       packs SRC (or its first N images per class) into one archive to carry to the
#       GPU machine: the whole 60,000-image folder gzips to 19.8 MB (the decoded
#       uint8 tensors, 184 MB, do not fit in what travels; they are rebuilt there in
#       seconds by the folder cache).
# Needs torch and torchvision; Optuna for the search (a small wheel: carry it where it is
# not installed, e.g. `pip download optuna` and PYTHONPATH); Ray is optional.
# Environment: PYTHON, LIMIT, ADAPT_EPOCHS (8), TRIALS (48), TRIAL_EPOCHS (1),
# SEARCH_S (150), RETRAIN_EPOCHS (8), GPU_SHARE (0.25), RUNNER (auto: ray where it is
# installed, else local; the toy: local), TOY=1 (as --toy).
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "pack" ]; then
  src=$2 out=$3 ntrain=${4:-0} ntest=${5:-0}
  if [ "$ntrain" = 0 ]; then
    tar czf "$out" -C "$(dirname "$src")" "$(basename "$src")"
  else
    tmp=$(mktemp -d)
    $py - "$src" "$tmp/$(basename "$src")" "$ntrain" "$ntest" <<'EOF'
import shutil, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), {"train": int(sys.argv[3]), "test": int(sys.argv[4])}
for split, k in n.items():
    for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
        (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:k]:
            shutil.copy(f, dst / split / cls.name / f.name)
EOF
    tar czf "$out" -C "$tmp" "$(basename "$src")"; rm -rf "$tmp"
  fi
  ls -l "$out"; exit 0
fi

toy=${TOY:-0}
if [ "${1:-}" = "--toy" ]; then toy=1; shift; fi
data=${1:-} ckpt=${2:-} work=${3:-gpu_real_work}
if [ "$toy" = 1 ]; then
  work=${3:-gpu_real_toy}
  data=${data:-../shared/data/cifar10-jpg}
  : "${LIMIT:=900}" "${ADAPT_EPOCHS:=1}" "${TRIALS:=4}" "${TRIAL_EPOCHS:=1}" "${SEARCH_S:=240}"
  : "${RETRAIN_EPOCHS:=1}" "${GPU_SHARE:=0.5}" "${RUNNER:=local}"
fi
: "${LIMIT:=480}" "${ADAPT_EPOCHS:=8}" "${TRIALS:=48}" "${TRIAL_EPOCHS:=1}" "${SEARCH_S:=150}"
: "${RETRAIN_EPOCHS:=8}" "${GPU_SHARE:=0.25}"
if [ -z "$data" ] || { [ "$toy" != 1 ] && [ -z "$ckpt" ]; }; then
  sed -n '2,30p' "$0"; exit 2
fi
mkdir -p "$work"
work=$(cd "$work" && pwd)
start=$SECONDS
left() { echo $((LIMIT - (SECONDS - start))); }
step() { local name=$1; shift; echo "== $name"; local t=$SECONDS
  "$@" >"$work/$name.log" 2>&1; local rc=$?
  tail -n "${TAIL:-4}" "$work/$name.log"; echo "== $name: exit $rc in $((SECONDS - t)) s" \
    "(total $((SECONDS - start)) s)"; return $rc; }
json() { $py -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); \
print(f'{100 * v:.2f}%' if sys.argv[2].endswith('acc') else f'{v / 1e6:.2f}M')" "$@" 2>/dev/null \
  || echo "n/a"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi: no GPU here"
$py -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, '| device', torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else 'cpu')"
$py -c "from search.run.gpu_share import mps_status; print(mps_status())"

# ---- the data: a folder, an archive of one, or (toy) a few images per class of it
if [ -f "$data" ]; then
  echo "== unpacking $data"; mkdir -p "$work/data"; tar xf "$data" -C "$work/data"
  data=$(dirname "$(find "$work/data" -maxdepth 3 -type d -name train | head -n 1)")
fi
if [ "$toy" = 1 ]; then
  sub="$work/toy_data"; rm -rf "$sub"
  $py - "$data" "$sub" <<'EOF'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for split, k in (("train", 24), ("test", 10)):
    for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
        (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:k]:
            shutil.copy(f, dst / split / cls.name / f.name)
EOF
  data=$sub
fi
[ -d "$data/train" ] || { echo "error: $data has no train/ folder"; exit 2; }
echo "data: $data ($(find "$data" -name '*.jpg' | wc -l) JPEG files)"

has() { $py launch.py "$1" --help 2>/dev/null | grep -q -- "$2"; }
common=(--data_set folder --data_path "$data" --input_size 32 --arch resnet --cfg resnet56
        --no_progress --gpus 0)
if has sketch --normalize; then norm=(--normalize imagenet)
else norm=(); echo "note: this launch.py has no --normalize: the default normalisation is used"; fi
decay=$(( RETRAIN_EPOCHS * 3 / 4 > 0 ? RETRAIN_EPOCHS * 3 / 4 : 1 ))
schedule=(--num_epochs "$RETRAIN_EPOCHS" --lr 0.01 --lr_decay_step "$decay")

if [ -z "$ckpt" ]; then  # toy only: a stand-in for the public checkpoint
  step stand_in $py launch.py pretrain "${common[@]}" "${norm[@]}" --num_epochs 1 \
    --job_dir "$work/stand_in" --reset
  ckpt=$work/stand_in/checkpoint/model_best.pt
fi

# ---- (1) the public ResNet-56 and the adapted baseline
TAIL=2 step public_test $py launch.py sketch --test_only --sketch_model "$ckpt" "${common[@]}" \
  "${norm[@]}" --job_dir "$work/public"
adecay=$(( ADAPT_EPOCHS * 3 / 4 > 0 ? ADAPT_EPOCHS * 3 / 4 : 1 ))
adapt=(--num_epochs "$ADAPT_EPOCHS" --lr 0.01 --lr_decay_step "$adecay" --job_dir "$work/adapted"
       --reset)
if has pretrain --init; then
  step adapted $py launch.py pretrain --init "$ckpt" "${common[@]}" "${norm[@]}" "${adapt[@]}"
else
  echo "note: this launch.py has no pretrain --init: the adapted baseline is a full-width" \
       "fine-tune (sketch --sketch_rate [1.0]*27)"
  step adapted $py launch.py sketch --sketch_model "$ckpt" --sketch_rate '[1.0]*27' \
    --sketch_mode select "${common[@]}" "${norm[@]}" "${adapt[@]}"
fi
base=$work/adapted/checkpoint/model_best.pt
echo "public ResNet-56: $(grep -o 'test acc [0-9.]*%' "$work/public_test.log" || echo n/a)"
echo "adapted baseline: test acc $(json "$work/adapted/result.json" test_acc)"

# ---- (2) the search
config=configs/cifar10_folder_resnet56.yaml
sets=(model.data_path="$data" model.pretrained="$base" budget.num_samples="$TRIALS"
      budget.time="${SEARCH_S}s" trial.epochs="$TRIAL_EPOCHS" trial.step=graph
      retrain.enabled=false resources.gpu="$GPU_SHARE" storage.name=search
      storage.storage_path="$work")
if [ ! -f "$config" ]; then
  echo "note: $config is not here: configs/cifar10_resnet56.yaml on the folder data instead"
  config=configs/cifar10_resnet56.yaml
  sets+=(model.data_set=folder model.input_size=32)
fi
if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  sets+=(resources.gpu=0 resources.cpu=1); echo "note: no CUDA here: trials on the CPU"
fi
[ "$toy" = 1 ] && sets+=(trial.bn_batches=1 trial.batch_size=32 sampler.anchors=1
                         'space.paper_rates=["[0.4]*27"]')
rm -rf "$work/search"
setargs=(); for s in "${sets[@]}"; do setargs+=(--set "$s"); done
runner=${RUNNER:-auto}
if [ "$runner" = auto ]; then
  if $py -c "import ray" 2>/dev/null; then runner=ray; else runner=local; fi
fi
if [ "$runner" = ray ]; then
  TAIL=6 step search $py launch.py search --config "$config" "${setargs[@]}"
else
  echo "no Ray here: the Ray-free loop, ${GPU_SHARE} GPU per trial"
  TAIL=6 step search $py -m search.run.local_loop --config "$config" "${setargs[@]}" \
    --gpus_per_trial "$GPU_SHARE" --exp_dir "$work/search"
fi

# ---- (3) the pick at <= 50% FLOPs and the uniform vector of equal or higher FLOPs
$py - "$work/search" "$work" <<'EOF'
import json, sys
from pathlib import Path
from search.results.trials_file import read_records
from search.propose.space import RateSpace
exp, work = Path(sys.argv[1]), Path(sys.argv[2])
recs = [r for r in read_records(exp / "trials.jsonl") if r.get("status") in ("completed", "stopped")
        and r.get("flops_ratio") is not None and r["flops_ratio"] <= 0.5 and r.get("val_acc") is not None]
done = [r for r in recs if r["status"] == "completed"] or recs
if not done:
    print("no trial at <= 50% FLOPs ended: step 3 has nothing to retrain"); sys.exit(0)
pick = max(done, key=lambda r: r["val_acc"])
space = RateSpace("resnet56", "cifar10")
flops = space.cost(pick["rates"]).flops
r = next(x / 100 for x in range(5, 101, 5) if space.cost([x / 100] * 27).flops >= flops)
uni = [r] * 27
(work / "pick.json").write_text(json.dumps({"pick": pick["rates"], "uniform": uni}))
print(f"pick: trial {pick['trial_id']}, val acc {100 * pick['val_acc']:.2f}%, FLOPs "
      f"{100 * pick['flops_ratio']:.1f}% ({flops / 1e6:.2f}M MACs) of {len(read_records(exp / 'trials.jsonl'))} trials")
print(f"uniform: [{r}]*27, FLOPs {space.cost(uni).flops / 1e6:.2f}M MACs")
EOF
retrain() { local name=$1 rates=$2
  step "retrain_$name" $py launch.py sketch --sketch_model "$base" --sketch_rate "$rates" \
    --sketch_mode select "${common[@]}" "${norm[@]}" "${schedule[@]}" --job_dir "$work/$name" --reset
  echo "$name: test acc $(json "$work/$name/result.json" test_acc)" \
       "FLOPs $(json "$work/$name/result.json" flops) MACs"; }
estimate=0
if [ -f "$work/pick.json" ]; then
  for which in pick uniform; do
    if [ "$(left)" -le "$estimate" ]; then echo "== retrain_$which: skipped, too little time left"; continue; fi
    t=$SECONDS
    retrain "$which" "$($py -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" \
      "$work/pick.json" "$which")"
    estimate=$((SECONDS - t))
  done
  a=$(json "$work/pick/result.json" test_acc) b=$(json "$work/uniform/result.json" test_acc)
  $py -c "import sys; a, b = (float(v.rstrip('%')) for v in sys.argv[1:]); \
print(f'pick - uniform: {a - b:+.2f} points of test accuracy')" "$a" "$b" 2>/dev/null \
    || echo "pick - uniform: n/a"
fi

# ---- (4) [0.6]*27 with the same schedule, if time is left
if [ "$(left)" -gt "$estimate" ]; then retrain uniform_0.6 '[0.6]*27'
else echo "== retrain_uniform_0.6: skipped, $(left) s left"; fi
echo "total $((SECONDS - start)) s"
