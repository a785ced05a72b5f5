#!/usr/bin/env bash
# The GPU check: one call of at most TOTAL=480 s (8 minutes) on one H100/H200 with 16 CPU cores, no network needed.
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # the whole script on the CPU (gloo), tiny sizes, TOTAL=300 s
# What it runs, in order; each part ends by its share of the budget, and what a part leaves goes to the next:
#   0. one line: torch, torchvision, the GPU, its memory (nvidia-smi);
#   1. (by 15%) the tests that need CUDA (pytest -m cuda), then the bf16 tests (pytest -k bf16);
#   2. (by 62%) every method file (each top-level *.py but common.py, test_all.py, conftest.py, hubconf.py; a new
#      file joins as it is): 100 steps of ResNet-18 (MAE: vit-tiny), batch 256, on Fashion-MNIST, under torchrun
#      --nproc_per_node=1 (NCCL, bf16):
#      img/s of the last progress line, peak GPU memory, kNN top-1, from its metrics.jsonl. Colorization needs
#      colour: it runs on 224 px JPEGs the script writes (batch 64, 2 epochs of 3200 files);
#   3. (by 95%) at 224 px: MoCo v2 ResNet-50 end to end (pipeline.py --train-steps: fed by 16 workers, against the same
#      steps on batches already on the device; the device stage's rate on CUDA), cpc.py's default trunk on the JPEGs
#      (loss at every step: it must fall), dino.py's ViT-S/16 on the JPEGs (2 x 224 + 8 x 96 crops, batch 64), mae.py's
#      ViT-B/16 and mocov3.py's ViT-S/16 on the JPEGs (batch 64), the input pipeline of 4 more methods,
#      benchmarks/speed.py (ResNet-50; MAE and MoCo v3 on ViT-S/16);
#   4. (the rest) part 2 again with --compile, method by method while time is left.
# Every timeout is computed from the time left before its part's end; RESERVE=20 s are kept for the table, so the
# table always prints and the script ends by TOTAL, whatever any part costs. Exit status 1 if a run failed (exit N).
# Output: exactly these 4 files in $OUT (default /tmp/gpu_check; other files there are left alone), < 1 MB in all:
#   summary.md     the table: a row per method file (ok / exit N / timeout / skipped: time / skipped: no data),
#                  img/s, peak GiB, kNN top-1, the same for --compile; then the 224 px figures and the other steps
#   gpu_check.log  everything printed
#   tests.log      pytest's output
#   runs.log       the last 60 lines of every other run's output
# Everything large (run folders, checkpoints, JPEGs, TMPDIR, the compile cache) goes to $WORK (default
# /tmp/gpu_check_work), removed at the start. Data: Fashion-MNIST's 4 idx .gz files from $FASHION if set, else from
# Debian's /usr/share/datasets/fashion-mnist, else data/fashion-mnist (git-ignored: carry it to the GPU machine).
# Without them the Fashion-MNIST runs are skipped (no download). PARTS=1234 picks parts.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check} WORK=${WORK:-/tmp/gpu_check_work} RESERVE=${RESERVE:-20} PARTS=${PARTS:-1234}
if [ "${1:-}" = --dry-run ]; then  # CPU, gloo, tiny sizes: checks the script, not the figures
  export CUDA_VISIBLE_DEVICES=""
  TOTAL=${TOTAL:-300} ENDS=${ENDS:-"10 62 75"} GRACE=3 MIN=5 CMIN=5 CFIRST=rotation  # compiles fastest on CPU
  ARCH=resnet-tiny STEPS=2 BATCH=16 LOADERS=0 WORKERS=1 JPEGS=64
  COLOUR="--batch-size 16 --image-size 64 --prior-images 32" BF16="bf16 and rotation" E2E_STEPS=2
  PIPE="--images 16 --photos 2 --samples 2 --batch-size 4 --loader-batches 1 --image-size 96"
  CPC224="--arch resnet-tiny --batch-size 4 --max-steps 2 --image-size 64"
  DINO224="--arch vit-tiny --batch-size 4 --max-steps 2 --image-size 64 --out-dim 1024"
  MAE224="--arch vit-tiny --batch-size 4 --max-steps 2 --image-size 64 --decoder-dim 32 --decoder-depth 1 --decoder-heads 4"
  MOCOV3224="--arch vit-tiny --batch-size 4 --max-steps 2 --image-size 64 --moco-mlp-dim 64"
  SPEED="--methods rotation --steps 1 --warmup 1 --batch-size 4"
else
  TOTAL=${TOTAL:-480} ENDS=${ENDS:-"15 60 95"} GRACE=10 MIN=15 CMIN=40 CFIRST=""
  ARCH=resnet18 STEPS=100 BATCH=256 LOADERS=8 WORKERS=16 JPEGS=3200
  COLOUR="--batch-size 64 --epochs 2 --prior-images 512" BF16="bf16" E2E_STEPS=40 PIPE="--samples 64 --loader-batches 8"
  CPC224="--batch-size 32 --max-steps 100" DINO224="--arch vit-small --batch-size 64 --max-steps 40" SPEED="--arch resnet50 --image-size 224 --batch-size 64 --vit-arch vit-small"
  MAE224="--arch vit-base --batch-size 64 --max-steps 40" MOCOV3224="--arch vit-small --batch-size 64 --max-steps 40"
fi
declare -A EXTRA=([moco]="--mlp --aug-plus --moco-t 0.2 --cos --moco-k 4096" [instdisc]="--nce-k 4096" [mae]="--arch vit-tiny")
declare -A NEEDS_COLOUR=([colorization]=1)  # runs on the JPEGs (Fashion-MNIST is grey)
ORDER="simclr moco instdisc cpc rotation jigsaw context_encoder denoising_autoencoder relative_position colorization"
FILES=" $(ls ./*.py | sed -n 's|^\./\(.*\)\.py$|\1|p' | grep -vxE 'common|test_all|conftest|hubconf' | tr '\n' ' ')"
METHODS=$(for m in $ORDER $FILES; do [[ $FILES == *" $m "* ]] && echo "$m"; done | awk '!seen[$0]++' | tr '\n' ' ')
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK/logs" "$WORK/runs" "$WORK/tmp" && export TMPDIR="$WORK/tmp"
rm -f "$OUT/summary.md" && : > "$OUT/tests.log" && : > "$OUT/runs.log" && : > "$WORK/status.tsv"
read -r END1 END2 END3 <<< "$ENDS"
now() { echo $(( $(date +%s) - START )); }
by() { echo $(( (TOTAL - RESERVE) * $1 / 100 )); }  # the second by which a part ends: its share, cumulative
part() { [[ $PARTS == *$1* ]]; }
record() { printf '%s\t%s\n' "$1" "$2" >> "$WORK/status.tsv"; echo "$1: $2"; }

# go NAME END CMD...: CMD under a timeout of the seconds left before END (less the kill grace), unless fewer than MIN
# are left; its output in $WORK/logs/NAME.log, the last 60 lines appended to $OUT/${LOG:-runs.log}
go() {
  local name=$1 t=$(( $2 - $(now) - GRACE )) rc status; shift 2
  if [ "$t" -lt "$MIN" ]; then record "$name" "skipped: time"; return 1; fi
  (timeout -k $GRACE "$t" "$@"; rc=$?; exit $rc) > "$WORK/logs/$name.log" 2>&1; rc=$?  # (bash says Killed there)
  case $rc in 0) status=ok;; 124|137) status=timeout;; *) status="exit $rc";; esac
  { echo "==== $name: $status at $(now) s; $*"; tail -n 60 "$WORK/logs/$name.log"; } >> "$OUT/${LOG:-runs.log}"
  record "$name" "$status"
  [ "$status" = ok ] && return 0
  tail -n 3 "$WORK/logs/$name.log" | cut -c1-200
  return 1
}
jpegs() {  # jpegs NAME END: ImageNet-like JPEGs for NAME (benchmarks/pipeline.py's), written once; else NAME skipped
  [ -f "$WORK/jpegs.done" ] && return
  rm -rf "$WORK/jpegs"
  MIN=5 go "write $JPEGS JPEGs" "$2" python -c "import sys; sys.path.insert(0, 'benchmarks'); import pipeline
pipeline.write_jpegs('$WORK/jpegs', $JPEGS, 32)" && touch "$WORK/jpegs.done" && return
  [[ $(tail -n 1 "$WORK/status.tsv") == *"skipped: time" ]] && record "$1" "skipped: time" || record "$1" "skipped: no JPEGs"
  return 1
}
method() {  # method FILE END [--compile]: $STEPS steps of FILE under torchrun, its run folder in $WORK/runs
  local m=$1 end=$2 data
  if [ "${NEEDS_COLOUR[$m]:-}" ]; then
    jpegs "$m${3:+ $3}" "$end" || return
    data="--data $WORK/jpegs $COLOUR"
  elif [ -z "$FM" ]; then record "$m${3:+ $3}" "skipped: no data"; return
  else data="--dataset fashion-mnist --data $FM --subset $((BATCH * STEPS))"; fi
  go "$m${3:+ $3}" "$end" torchrun --standalone --nproc_per_node=1 "$m.py" --arch "$ARCH" --batch-size "$BATCH" \
    --epochs 1 --max-steps "$STEPS" --print-freq $(( STEPS / 4 > 0 ? STEPS / 4 : 1 )) --probe-epochs 0 \
    --workers "$LOADERS" $data ${EXTRA[$m]:-} ${3:-} --out "$WORK/runs/$m${3:+_compiled}"
}

main() {
  timeout -k 2 30 python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
             torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device', end='; ')"
  timeout -k 2 10 nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "budget $TOTAL s (parts end by ${ENDS// /%, }%, table $RESERVE s); out $OUT; work $WORK; methods: $METHODS"
  FM=""
  if [ -n "${FASHION:-}" ]; then DIRS=("$FASHION"); else DIRS=(/usr/share/datasets/fashion-mnist data/fashion-mnist); fi
  for d in "${DIRS[@]}"; do ls "$d"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz > /dev/null 2>&1 && FM=$d && break; done
  [ -n "$FM" ] && echo "Fashion-MNIST: $FM" || echo "Fashion-MNIST not found in ${DIRS[*]}; carry data/fashion-mnist" \
    "(4 idx .gz files) to run parts 2 and 4 on it"

  if part 1; then
    echo "== 1. tests that need CUDA (pytest -m cuda), then -k \"$BF16\"; output in tests.log"
    LOG=tests.log MIN=5 go "pytest -m cuda" "$(by "$END1")" python -m pytest -q -rs -m cuda test_all.py
    LOG=tests.log go "pytest -k $BF16" "$(by "$END1")" python -m pytest -q -rs -k "$BF16" test_all.py
  fi
  if part 2; then
    echo "== 2. every method file, $STEPS steps, $ARCH, batch $BATCH, torchrun --nproc_per_node=1"
    for m in $METHODS; do method "$m" "$(by "$END2")"; done
  fi
  if part 3; then
    echo "== 3. 224 px: MoCo v2 ResNet-50 end to end, cpc.py's default trunk, the input pipeline, speed.py"
    go "moco v2 end to end" "$(by "$END3")" python benchmarks/pipeline.py --workers "$WORKERS" $PIPE --methods "moco v2" \
      --train-steps "$E2E_STEPS" --out "$WORK/pipeline_moco"
    jpegs "cpc 224 px" "$(by "$END3")" && go "cpc 224 px" "$(by "$END3")" torchrun --standalone --nproc_per_node=1 cpc.py \
      --data "$WORK/jpegs" $CPC224 --epochs 1 --print-freq 1 --probe-epochs 0 --workers "$WORKERS" --out "$WORK/runs/cpc_224"
    jpegs "dino vit-small 224 px" "$(by "$END3")" && go "dino vit-small 224 px" "$(by "$END3")" torchrun --standalone \
      --nproc_per_node=1 dino.py --data "$WORK/jpegs" $DINO224 --epochs 1 --print-freq 10 --probe-epochs 0 \
      --workers "$WORKERS" --out "$WORK/runs/dino_224"
    for m in mae mocov3; do
      flags=MAE224 && [ $m = mocov3 ] && flags=MOCOV3224
      jpegs "$m 224 px" "$(by "$END3")" && go "$m 224 px" "$(by "$END3")" torchrun --standalone --nproc_per_node=1 \
        $m.py --data "$WORK/jpegs" ${!flags} --epochs 1 --print-freq 10 --probe-epochs 0 --workers "$WORKERS" \
        --out "$WORK/runs/${m}_224"
    done
    go "pipeline 224 px" "$(by "$END3")" python benchmarks/pipeline.py --workers "$WORKERS" $PIPE --methods simclr \
      "moco v1" instdisc rotation --out "$WORK/pipeline"
    go "speed.py" "$(by "$END3")" python benchmarks/speed.py $SPEED
  fi
  if part 4; then
    echo "== 4. every method file again with --compile, while time is left"
    for m in $(echo $CFIRST $METHODS | tr ' ' '\n' | awk '!seen[$0]++'); do
      MIN=$CMIN method "$m" "$(by 100)" --compile
    done
  fi

  echo "== table ($(now) s)"
  timeout -k 2 $(( RESERVE - 5 )) python - "$OUT" "$WORK" "$METHODS" <<'EOF'
import json, os, re, sys
out, work, methods = sys.argv[1], sys.argv[2], sys.argv[3].split()
status = dict(line.rstrip("\n").split("\t") for line in open(os.path.join(work, "status.tsv")))

def figures(folder):  # img/s and peak GiB of the last progress line, the final kNN top-1
    try:
        rows = [json.loads(line) for line in open(os.path.join(work, "runs", folder, "metrics.jsonl"))]
    except OSError:
        return ["", "", ""]
    steps, final = [r for r in rows if "img_per_s" in r], [r for r in rows if "knn_top1" in r]
    return [f"{steps[-1]['img_per_s']:.0f}" if steps else "", f"{steps[-1]['peak_gib']:.2f}" if steps and
            "peak_gib" in steps[-1] else "", f"{final[-1]['knn_top1']:.2f}" if final else ""]

lines = ["| method file | status | img/s | peak GiB | kNN top-1 | --compile | img/s | peak GiB | kNN top-1 |",
         "|---" * 9 + "|"]
for m in methods:
    lines.append("| " + " | ".join([m, status.get(m, "not run"), *figures(m), status.get(m + " --compile", "not run"),
                                    *figures(m + "_compiled")]) + " |")
for name in ("moco v2 end to end", "pipeline 224 px", "speed.py"):
    if status.get(name) == "ok":
        lines += ["", f"{name}:", ""] + [l.rstrip() for l in open(os.path.join(work, "logs", name + ".log"))
                                         if l.startswith(("|", "official")) or " JPEGs (" in l or " px, batch" in l]
if status.get("cpc 224 px") in ("ok", "timeout"):
    log = open(os.path.join(work, "logs", "cpc 224 px.log")).read()
    losses = " ".join(re.findall(r"step \d+/\d+ loss ([0-9.naif]+)", log))
    lines += ["", "cpc 224 px, {}: img/s {}, peak GiB {}, kNN {}; loss at every step: {}".format(
        status["cpc 224 px"], *[v or "-" for v in figures("cpc_224")], losses)]
for name, folder in (("dino vit-small 224 px", "dino_224"), ("mae 224 px", "mae_224"), ("mocov3 224 px", "mocov3_224")):
    if status.get(name) in ("ok", "timeout"):
        lines += ["", "{}, {}: img/s {}, peak GiB {}, kNN {}".format(name, status[name],
                                                                   *[v or "-" for v in figures(folder)])]
lines += ["", "other steps: " + "; ".join(f"{k}: {v}" for k, v in status.items() if k.split(" --")[0] not in methods)]
text = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(text)
print(text, end="")
EOF
  echo "total $(now) s"
  ! grep -q $'\texit' "$WORK/status.tsv"
}
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
