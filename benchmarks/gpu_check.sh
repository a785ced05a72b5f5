#!/usr/bin/env bash
# The GPU check, one prepared script for one H100/H200 (about 5 minutes, no network needed):
#   bash benchmarks/gpu_check.sh            # Fashion-MNIST from Debian's package or data/fashion-mnist (4 idx .gz, 30 MB)
# 1. the input pipeline at 224 px on ImageNet-like JPEGs it writes itself: every method's worker stage, device stage
#    and loader with 16 workers; MoCo v2 ResNet-50 end to end, loaded against the same steps on data on the device;
# 2. benchmarks/speed.py at 224 px (ResNet-50, bf16, channels_last): each method's step against its bare trunk; then
#    cpc.py's default trunk at 224 px on those JPEGs, 100 steps, its loss at every step (it must fall, never NaN);
#    colorization.py on those JPEGs (Fashion-MNIST is grey);
# 3. every method file, 100 steps on Fashion-MNIST with ResNet-18 under torchrun (NCCL, bf16, channels_last):
#    img/s, peak GPU memory, kNN; then the same with --compile while time is left;
# 4. the tests that touch the device (the CUDA device stage, bf16 runs) with the GPU visible.
# Each part has its own time limit, so the table at the end always prints. Logs go to $OUT (default /tmp/gpu_check).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT/runs"
FM=/usr/share/datasets/fashion-mnist
[ -f "$FM/train-images-idx3-ubyte.gz" ] || FM=data/fashion-mnist
# a dry run on a small CPU machine: WORKERS=2 ARCH=resnet-tiny STEPS=2 BATCH=16 PIPELINE="--images 64 --samples 4
# --batch-size 16 --loader-batches 1" SPEED="--arch resnet-tiny --image-size 32" CPC224="--arch resnet-tiny
# --batch-size 4 --max-steps 3" bash benchmarks/gpu_check.sh
WORKERS=${WORKERS:-16} ARCH=${ARCH:-resnet18} STEPS=${STEPS:-100} BATCH=${BATCH:-256}
PIPELINE=${PIPELINE:-"--samples 64 --loader-batches 8"} SPEED=${SPEED:-"--arch resnet50 --image-size 224 --batch-size 64"}
CPC224=${CPC224:-"--batch-size 32 --max-steps 100"}
START=$(date +%s)
left() { echo $(( ${BUDGET:-330} - ($(date +%s) - START) )); }
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

echo "== 1. input pipeline (224 px, $WORKERS workers; MoCo v2 ResNet-50 end to end)"
timeout 150 python benchmarks/pipeline.py --workers "$WORKERS" $PIPELINE --methods simclr "moco v1" instdisc rotation \
  2>&1 | tee "$OUT/pipeline.txt" | tail -8
timeout 150 python benchmarks/pipeline.py --workers "$WORKERS" $PIPELINE --methods "moco v2" --train-steps 40 \
  2>&1 | tee "$OUT/pipeline_moco_v2.txt" | tail -4

echo "== 2. speed.py at 224 px"
timeout 120 python benchmarks/speed.py $SPEED 2>&1 | tee "$OUT/speed.txt" | tail -10

echo "== 2b. cpc.py at ImageNet size: its default trunk (pre-activation ResNet-101 to layer3), loss at every step"
python -c "import sys; sys.path.insert(0, 'benchmarks'); import pipeline; pipeline.write_jpegs('$OUT/jpegs', 3200, 32)"
timeout 120 torchrun --standalone --nproc_per_node=1 cpc.py --data "$OUT/jpegs" $CPC224 --epochs 1 --print-freq 1 \
  --probe-epochs 0 --workers "$WORKERS" --out "$OUT/runs/cpc_224" > "$OUT/cpc_224.log" 2>&1
echo "exit $?: $(grep -o 'step [0-9]*/[0-9]* loss [0-9.naif]*' "$OUT/cpc_224.log" | cut -d' ' -f2,4 | tr '\n' ' ')"
# colorization needs colour: the same JPEGs, $ARCH, $STEPS steps (Fashion-MNIST is grey)
timeout 120 torchrun --standalone --nproc_per_node=1 colorization.py --data "$OUT/jpegs" --arch "$ARCH" --batch-size 64 \
  --max-steps "$STEPS" --epochs 2 --prior-images 512 --print-freq 25 --probe-epochs 0 --workers "$WORKERS" \
  --out "$OUT/runs/colorization_224" > "$OUT/colorization_224.log" 2>&1
echo "colorization 224 px: exit $? ($(tail -1 "$OUT/colorization_224.log" | cut -c1-120))"

echo "== 3. every method, $STEPS steps on Fashion-MNIST, $ARCH, torchrun --nproc_per_node=1"
declare -A EXTRA=([moco]="--mlp --aug-plus --moco-t 0.2 --cos --moco-k 4096" [instdisc]="--nce-k 4096" [jigsaw]="" [cpc]="" \
                  [simclr]="" [rotation]="" [context_encoder]="" [denoising_autoencoder]="" [relative_position]="")
for compiled in "" "--compile"; do
  for m in simclr moco instdisc rotation jigsaw context_encoder cpc denoising_autoencoder relative_position; do
    [ "$(left)" -gt 40 ] || { echo "skip $m $compiled: time"; continue; }
    run="$OUT/runs/$m${compiled:+_compiled}"
    timeout $(( $(left) - 20 )) torchrun --standalone --nproc_per_node=1 "$m.py" --dataset fashion-mnist --data "$FM" \
      --arch "$ARCH" --batch-size "$BATCH" --subset $((BATCH * STEPS)) --epochs 1 --max-steps "$STEPS" \
      --print-freq $(( STEPS / 4 > 0 ? STEPS / 4 : 1 )) --probe-epochs 0 --workers 8 ${EXTRA[$m]} $compiled \
      --out "$run" > "$run.log" 2>&1
    echo "$m${compiled:+ --compile}: exit $? ($(tail -1 "$run.log" | cut -c1-120))"
  done
done

echo "== 4. tests with the GPU visible"
timeout $(( $(left) > 30 ? $(left) : 30 )) python -m pytest -q -x test_all.py \
  -k "colour or hue or grayscale or pil_path or parameter_draws or uint8_views or cuda_equals or bf16" 2>&1 | tail -3

echo "== table: training runs (img/s of the last progress line, peak GPU memory, kNN top-1)"
python - "$OUT/runs" <<'EOF'
import glob, json, os, sys
print("| run | img/s | peak GiB | kNN top-1 |\n|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "metrics.jsonl"))):
    rows = [json.loads(line) for line in open(path)]
    steps = [r for r in rows if "img_per_s" in r]
    final = [r for r in rows if "knn_top1" in r]
    print(f"| {os.path.basename(os.path.dirname(path))} | {steps[-1]['img_per_s']:.0f} | "
          f"{steps[-1].get('peak_gib', float('nan')):.1f} | {final[-1]['knn_top1'] if final else 'n/a'} |")
EOF
echo "total $(( $(date +%s) - START )) s"
