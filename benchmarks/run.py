"""Representation quality of every sslref method under one protocol on Fashion-MNIST, with three anchors.

    python benchmarks/run.py --protocol cpu        # resnet-tiny, 10,000 images, 4 minutes of pretraining each
    python benchmarks/run.py --protocol gpu        # resnet18 (CIFAR stem), all 60,000 images, 2 epochs each
    python benchmarks/run.py --protocol cpu --plot-only   # redraw curves_cpu.png and results.md from results.json

Each method pretrains on the training split with its own file's recipe for short runs (documented there), then
the same probes score its frozen trunk at every stage (--probe-stages): weighted kNN (k 200, t 0.1) and a 30-epoch
linear probe, trained on the pretraining images and tested on the 10,000 test images; the kNN monitor runs each
epoch on 2,000 class-balanced images of each set. Anchors on the same probes: the random-init trunk, raw pixels, and
the same trunk trained with labels (cross-entropy) for the same budget. Two methods are rerun with two more seeds
(the noise band). Writes benchmarks/results.json (every protocol run so far), benchmarks/results.md (its tables)
and, with matplotlib (benchmarks/requirements.txt), benchmarks/curves_<protocol>.png.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

METHODS = ["simclr", "moco", "instdisc", "cpc", "rotation", "jigsaw", "context_encoder", "denoising_autoencoder",
           "relative_position", "byol", "simsiam", "barlow_twins", "vicreg", "swav", "dino", "dino-vit", "mae-vit",
           "mocov3-vit"]
MODULE = {"dino-vit": "dino", "mae-vit": "mae", "mocov3-vit": "mocov3"}  # a row of another trunk: its method file
# the rows also fine-tuned end to end (--finetune-epochs, the protocol's "finetune" flags): MAE is judged by it
FINETUNED = ["simclr", "dino-vit", "mae-vit", "mocov3-vit", "random-init", "random-init-vit"]

# Each method's short-run recipe; the method file's header gives its source.
# SwAV: LARC at the batch-4096 recipe's lr 4.8 (batch 256's 0.6 moves the weights 0.06% a step: for 800 epochs), the
# prototypes frozen for one epoch, 100 of them (10 classes), 2 + 2 crops
SWAV_RECIPE = ["--batch-size", "256", "--lr", "4.8", "--final-lr", "0.0048", "--freeze-prototypes-niters", "39",
               "--nmb-prototypes", "100", "--nmb-crops", "2", "2"]
# DINO: batch 64 (4x the steps of 256), AdamW at 5e-4 after one epoch of warm-up, the teacher's momentum from 0.99
# (0.996 moves it 37% of the way in 117 steps), K 1024, 2 + 2 crops
DINO_RECIPE = ["--batch-size", "64", "--lr", "0.002", "--warmup-epochs", "1", "--momentum-teacher", "0.99",
               "--out-dim", "1024", "--local-crops-number", "2"]
DINO_VIT_RECIPE = DINO_RECIPE + ["--arch", "vit-tiny"]
# MAE: AdamW at base lr 1e-3 (PRETRAIN.md's 1.5e-4 is for 800 epochs at batch 4096), one warm-up epoch, a decoder of
# 2 blocks 128 wide (8 x 512 would be 20x the encoder's cost on 12 kept patches)
MAE_VIT_RECIPE = ["--arch", "vit-tiny", "--batch-size", "256", "--lr", "1e-3", "--warmup-epochs", "1",
                  "--decoder-dim", "128", "--decoder-depth", "2", "--decoder-heads", "4"]
# MoCo v3: the ViT recipe (AdamW, T 0.2, frozen patch projection) at base lr 1e-3, one warm-up epoch, heads 1024 wide
MOCOV3_VIT_RECIPE = ["--arch", "vit-tiny", "--batch-size", "256", "--lr", "1e-3", "--warmup-epochs", "1",
                     "--moco-mlp-dim", "1024"]
RECIPES = {
    # sqrt lr scaling at 0.075 (SimCLR App. B.1, small batches and few epochs), CIFAR's jitter 0.5, a short warm-up
    "simclr": ["--batch-size", "256", "--lr-scaling", "sqrt", "--lr", "0.075", "--warmup-epochs", "0.5",
               "--color-jitter-strength", "0.5"],
    # MoCo v2 (--mlp --aug-plus --cos) with the official CIFAR demo's K 4096, m 0.99, T 0.1
    "moco": ["--batch-size", "128", "--mlp", "--aug-plus", "--cos", "--lr", "0.06", "--moco-k", "4096",
             "--moco-m", "0.99", "--moco-t", "0.1"],
    # lemniscate's CIFAR recipe: the full softmax over the bank (K/n of NCE is far from ImageNet's here), tau 0.1
    "instdisc": ["--batch-size", "128", "--lr", "0.06", "--nce-k", "0", "--nce-t", "0.1"],
    # v1's flags with Adam at 2e-3: v1's 2e-4 is for ~300K steps
    "cpc": ["--batch-size", "64", "--lr", "2e-3"],
    # the official CIFAR recipe (batch 128 at lr 0.1), no drops in a short run
    "rotation": ["--batch-size", "128", "--lr", "0.2", "--schedule"],
    # the Caffe solver's lr at batch 128, no drops in a short run
    "jigsaw": ["--batch-size", "128", "--lr", "0.05", "--schedule"],
    # the official train.lua (Adam 2e-4 / 2e-3, joint loss), random-region masks, batch 64
    "context_encoder": ["--batch-size", "64"],
    # the file's defaults (masking noise at nu 0.25, Adam 1e-3) at batch 128
    "denoising_autoencoder": ["--batch-size", "128"],
    # mmselfsup's lr per 256 at batch 128, no warm-up or drops; fc6-fc8 1024 wide (4096: 17x the trunk's MACs here)
    "relative_position": ["--batch-size", "128", "--lr", "0.1", "--fc-dim", "1024", "--warmup-epochs", "0", "--schedule"],
    # LARS at base lr 4.0 (the table's 0.2-0.45 is for 100+ epochs at batch 4096) and tau from 0.96 (below the 40-epoch
    # row's 0.97: 273 steps), half an epoch of warm-up; measured: 0.99 at lr 2.0 left the final layer at random init's
    "byol": ["--batch-size", "256", "--lr", "4.0", "--ema", "0.96", "--warmup-epochs", "0.5"],
    # SGD at base lr 0.8 (the paper's CIFAR recipe: 0.03 at batch 512 for 800 epochs); measured: 0.3 gave the final
    # layer random init's linear accuracy
    "simsiam": ["--batch-size", "256", "--lr", "0.8"],
    # the official lrs at batch 256, half an epoch of warm-up, a projector of 1024 (8192 is 98% of a CPU step here)
    "barlow_twins": ["--batch-size", "256", "--proj-dim", "1024", "--warmup-epochs", "0.5"],
    # the official lr at batch 256, half an epoch of warm-up, an expander of 1024
    "vicreg": ["--batch-size", "256", "--proj-dim", "1024", "--warmup-epochs", "0.5"],
    "swav": SWAV_RECIPE,
    "dino": DINO_RECIPE,
    "dino-vit": DINO_VIT_RECIPE,
    "mae-vit": MAE_VIT_RECIPE,
    "mocov3-vit": MOCOV3_VIT_RECIPE,
}

# The `cpu` protocol gives every method the same wall-clock budget of pretraining on 2 CPU cores, about 4 minutes:
# methods differ 8x in cost per epoch (CPC encodes 49 patches an image, InstDisc one view), so equal epochs would give
# one method eight times another's compute. Epochs = 240 s / each method's measured seconds per epoch at this protocol
# (simclr 18, moco 12, instdisc 9, cpc 72, rotation 31, jigsaw 41, context_encoder 32, denoising_autoencoder 12.4,
# relative_position 33, byol 33, simsiam 24, swav 35, dino 50, supervised 7.5); the table
# reports the minutes each run took. Every method is probed at every stage and monitored each epoch.
PROTOCOLS = {
    "cpu": {"flags": ["--arch", "resnet-tiny", "--subset", "10000", "--workers", "2", "--probe-stages",
                      "--eval-every", "1", "--monitor-subset", "2000"],
            "epochs": {"simclr": 13, "moco": 20, "instdisc": 27, "cpc": 3, "rotation": 8, "jigsaw": 6,
                       "context_encoder": 7, "denoising_autoencoder": 19, "relative_position": 7, "byol": 7, "simsiam": 10,
                       "barlow_twins": 8, "vicreg": 8, "swav": 7, "dino": 5, "dino-vit": 5, "mae-vit": 13,
                       "mocov3-vit": 5, "supervised": 32},
            # MAE's fine-tuning recipe for 5 epochs at batch 128: base lr 1e-3 and layer decay 0.75 (its ViT-L values:
            # 4 blocks), one warm-up epoch, MixUp and CutMix off (main_finetune.py's defaults; measured on the MAE
            # trunk of 8 epochs: 48.9 without, 42.6 with them, random init 36.9 / 37.2)
            "finetune": ["--finetune-epochs", "5", "--finetune-batch-size", "128", "--finetune-warmup-epochs", "1",
                         "--finetune-lr", "1e-3", "--layer-decay", "0.75", "--finetune-mixup", "0", "--finetune-cutmix", "0"],
            "noise": {"methods": ["simclr", "rotation"], "seeds": [1, 2]}},  # seed 0 is the table's run
    # one H100/H200: all 60,000 images, the same number of epochs for every method, the table in about 5 minutes
    "gpu": {"flags": ["--arch", "resnet18", "--workers", str(min(16, os.cpu_count() or 1)), "--probe-stages"],
            "epochs": dict.fromkeys(METHODS + ["supervised"], 2),
            "finetune": ["--finetune-epochs", "2", "--finetune-batch-size", "256"]},
    # the smoke test: two steps of batch 16 on whatever --data holds
    "smoke": {"flags": ["--arch", "resnet-tiny", "--subset", "64", "--workers", "0", "--max-steps", "2",
                        "--probe-epochs", "2", "--probe-stages", "--eval-every", "1", "--monitor-subset", "16"],
              "override": ["--batch-size", "16"], "method_override": {"jigsaw": ["--num-permutations", "24"]},
              "supervised_batch": 16, "epochs": dict.fromkeys(METHODS + ["supervised"], 1),
              "finetune": ["--finetune-epochs", "1", "--finetune-batch-size", "16"],
              "noise": {"methods": ["rotation"], "seeds": [1]}},
}
ANCHORS = ["random-init", "random-init-vit", "raw-pixels", "supervised"]
UNTRAINED = ("random-init", "random-init-vit", "raw-pixels")  # rows not compared with random init


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default="cpu", choices=list(PROTOCOLS))
    p.add_argument("--data", default="", help="Fashion-MNIST's idx .gz files (default: Debian's copy, else download)")
    p.add_argument("--methods", nargs="*", default=METHODS + ANCHORS, help="rows to run")
    p.add_argument("--no-noise", action="store_true", help="skip the noise band's reruns with other seeds")
    p.add_argument("--update", action="store_true",
                   help="rerun only the --methods rows (with their noise band unless --no-noise) and keep the other "
                        "methods' rows of the protocol's table; each row names its commit and torch")
    p.add_argument("--plot-only", action="store_true", help="redraw curves_<protocol>.png and results.md from results.json")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks"), help="folder of results.json / results.md")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "benchmarks"), help="the methods' output folders")
    return p.parse_args(argv)


def shared_flags(args, name=None):
    """The flags every row gets: data, protocol, probe; the fine-tuning flags for a FINETUNED row `name`."""
    return ["--dataset", "fashion-mnist", "--data", args.data, "--seed", "0", "--probe-epochs", "30",
            "--print-freq", "100"] + PROTOCOLS[args.protocol]["flags"] + (
        PROTOCOLS[args.protocol].get("finetune", []) if name in FINETUNED else [])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def pretraining_seconds(records, batch_size):
    """Seconds of training steps, from the progress lines' throughput (monitor, checkpoints and probes excluded)."""
    seconds, last_step = 0.0, 0
    for record in records:
        if "img_per_s" in record:
            seconds += (record["step"] - last_step) * batch_size / max(record["img_per_s"], 1e-9)
            last_step = record["step"]
    return seconds


def run_method(name, args, seed=0):
    module = __import__(MODULE.get(name, name))
    epochs = PROTOCOLS[args.protocol]["epochs"][name]
    protocol = PROTOCOLS[args.protocol]
    override = protocol.get("override", []) + protocol.get("method_override", {}).get(name, [])
    out = os.path.join(args.runs, name if not seed else f"{name}_seed{seed}")
    flags = shared_flags(args, name) + RECIPES[name] + override + ["--epochs", str(epochs), "--seed", str(seed), "--out", out]
    for stale in ("checkpoint.pth", "metrics.jsonl"):  # a fresh run, never a silent resume
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    results, records = module.main(flags), read_metrics(out)
    # the learning curve: the monitor's kNN each epoch on the stage that is best in the final evaluation
    best = results.get("best_stage_knn", "final")
    key = "knn_top1" if best == "final" else f"{best}_knn_top1"
    curve = [(r["epoch"], r[key]) for r in records if key in r and "loss" not in r and "linear_top1" not in r]
    seconds = pretraining_seconds(records, module.parse_args(flags).batch_size)
    return results, epochs, " ".join(RECIPES[name] + ["--epochs", str(epochs)]), seconds, curve


def probe_setup(args, train_transform, name=None):
    """The shared flags parsed (common.add_common_args), the datasets and the probe loaders, single process."""
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "benchmark", out=os.path.join(args.runs, "anchors"))
    margs = common.parse(parser, shared_flags(args, name))
    device = common.setup(margs)
    pretrain, probe_train, probe_test = common.build_datasets(margs, train_transform)
    return margs, device, pretrain, (probe_train, probe_test)


def run_anchor(name, args):
    """random-init: the trunk as built (kaiming init); raw-pixels: the normalised image flattened; supervised: the
    same trunk trained with labels (padded random crop + flip, SGD 0.1 per 256, momentum 0.9, wd 5e-4, cosine) for the
    protocol's budget. Also the monitor's kNN (its subset, best stage), the level the curves are drawn against."""
    size = common.DEFAULT_IMAGE_SIZE["fashion-mnist"]
    train_tf = T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(),
                          common.normalize("fashion-mnist")])
    margs, device, pretrain, probe_sets = probe_setup(args, train_tf, name)
    margs.arch = "vit-tiny" if name == "random-init-vit" else margs.arch  # the ViT rows' trunk
    trunk, width = (nn.Flatten(), None) if name == "raw-pixels" else common.build_backbone(margs.arch, margs.image_size,
                                                                                           vit=True)
    if name == "random-init-vit":  # as dino.py initialises its ViT (vision_transformer.py _init_weights)
        __import__("dino").vit_init(trunk)
    trunk = trunk.to(device)
    run = common.Run(margs, device, probe_sets, trunk, model=trunk)
    stages = None if name == "raw-pixels" else trunk
    epochs, start, recipe = 0, time.time(), {"raw-pixels": "normalised pixels, 3 x 28 x 28",
                                             "random-init": "kaiming init, BN statistics at init",
                                             "random-init-vit": "vit-tiny, DINO's init"}.get(name)
    if name == "supervised":
        epochs = PROTOCOLS[args.protocol]["epochs"]["supervised"]
        margs.batch_size = PROTOCOLS[args.protocol].get("supervised_batch", 128)
        recipe = f"cross-entropy, batch {margs.batch_size}, --epochs {epochs}"
        head = nn.Linear(width, int(common.dataset_labels(pretrain).max()) + 1).to(device)
        model = nn.Sequential(trunk, head)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * margs.batch_size / 256, momentum=0.9, weight_decay=5e-4)
        loader, sampler = common.train_loader(pretrain, margs)
        total = epochs * len(loader) if not margs.max_steps else min(margs.max_steps, epochs * len(loader))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
        step = 0
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for images, labels, _ in loader:
                if step == total:  # --max-steps reached (the smoke protocol): no further step in any epoch
                    break
                with torch.autocast(device.type, torch.bfloat16, enabled=margs.amp):
                    loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
    seconds = time.time() - start
    results = common.evaluate(trunk, *run.probe_loaders, device, margs, trunk=stages)
    if margs.finetune_epochs:
        results.update(common.finetune(trunk, run.probe_loaders, device, margs))
    monitor = common.evaluate(trunk, *run.monitor_loaders, device, margs, linear=False, trunk=stages)
    best = monitor.get("best_stage_knn", "final")
    level = monitor["knn_top1" if best == "final" else f"{best}_knn_top1"]
    return results, epochs, recipe, seconds, [(0, level), (max(PROTOCOLS[args.protocol]["epochs"].values()), level)]


def hardware():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()} CPU cores ({platform.machine()})"


def commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def best(row, kind):
    """(stage, top-1) of the row's best stage for kNN or linear; the final layer's when stages were not probed."""
    stage = row["results"].get(f"best_stage_{kind}", "final")
    return stage, row["results"][f"{kind}_top1" if stage == "final" else f"{stage}_{kind}_top1"]


def summary(row):
    r = row["results"]
    return {"best_knn": best(row, "knn"), "best_linear": best(row, "linear") if "linear_top1" in r else ("-", None),
            "knn": r["knn_top1"], "linear": r.get("linear_top1"), "finetune": r.get("finetune_top1")}


def fmt(v):
    return "-" if v is None else f"{v:.2f}"


def noise_band(rows):
    """Mean +- std (over seeds) of best-stage and final kNN / linear, for the methods rerun with other seeds."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows if r.get("seed")):
        runs = [summary(r) for r in rows if r["method"] == method]
        seeds = [r.get("seed", 0) for r in rows if r["method"] == method]
        cells = []
        for label, values in (("best-stage kNN", [s["best_knn"][1] for s in runs]),
                              ("best-stage linear", [s["best_linear"][1] for s in runs]),
                              ("final kNN", [s["knn"] for s in runs]), ("final linear", [s["linear"] for s in runs])):
            v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
            cells.append(f"{label} {v.mean():.2f} +- {v.std():.2f}" if len(v) > 1 else f"{label} -")
        lines.append(f"- {method}, seeds {', '.join(map(str, seeds))}: " + "; ".join(cells))
    return lines


def write_tables(everything, out):
    lines = ["# Benchmark results", "",
             "Written by `benchmarks/run.py`; the protocol is in the README's Results section. Top-1, %; a best-stage",
             "cell gives the stage and its score (stem, layer1-4 average-pooled to about 4.5 x the trunk's width, final:",
             "the pooled features).", ""]
    for protocol, table in everything.items():
        rows = [r for r in table["rows"] if not r.get("seed")]
        anchors = {r["method"]: summary(r) for r in rows if r["method"] in UNTRAINED}
        later = sorted({f"{r['method']} at {r['commit']}" for r in rows if r.get("commit", table["commit"]) != table["commit"]})
        lines += [f"## `{protocol}` protocol ({table['hardware']}, commit {table['commit']}, {table['date']}, "
                  f"torch {table.get('torch', '?')}{'; rerun since: ' + ', '.join(later) if later else ''})", "",
                  "| method | best kNN | best linear | final kNN | final linear | fine-tuned | against random-init's best "
                  "stage (kNN, linear), final layer (linear) and fine-tuned | epochs | pretraining | recipe |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            s = summary(row)
            vs = "-"
            anchor = anchors.get("random-init-vit" if row["method"].endswith("-vit") else "random-init")
            if anchor and row["method"] not in UNTRAINED and s["linear"] is not None:
                vs = (f"{s['best_knn'][1] - anchor['best_knn'][1]:+.1f}, {s['best_linear'][1] - anchor['best_linear'][1]:+.1f}, "
                      f"{s['linear'] - anchor['linear']:+.1f}")
                if s["finetune"] is not None and anchor["finetune"] is not None:
                    vs += f", {s['finetune'] - anchor['finetune']:+.1f}"
            lines.append(f"| {row['method']} | {s['best_knn'][0]} {fmt(s['best_knn'][1])} | {s['best_linear'][0]} "
                         f"{fmt(s['best_linear'][1])} | {fmt(s['knn'])} | {fmt(s['linear'])} | {fmt(s['finetune'])} | "
                         f"{vs} | {row['epochs']} | "
                         f"{row['pretrain_seconds'] / 60:.1f} min | `{row['recipe']}` |")
        spread = [f"{r['method']} {r['results']['z_std']:.4f}" for r in rows if "z_std" in r["results"]]
        if spread:  # the methods without negatives report SimSiam's collapse check (Sec. 4.1) at the end of training
            lines += ["", "Collapse check, the per-dimension std of the L2-normalised projection (1/sqrt(d) when spread "
                      "out, 0 when collapsed): " + ", ".join(spread) + "."]
        band = noise_band(table["rows"])
        lines += ([""] + ["Noise band (the same recipe with other seeds):"] + band if band else []) + [""]
        if any("stem_knn_top1" in r["results"] for r in rows):
            lines += ["Every stage, kNN / linear:", "", "| method | " + " | ".join(common.STAGES) + " |",
                      "|---|" + "---|" * len(common.STAGES)]
            for row in rows:
                r = row["results"]
                cells = [f"{fmt(r.get(p + 'knn_top1'))} / {fmt(r.get(p + 'linear_top1'))}"
                         for p in [f"{s}_" for s in common.STAGES[:-1]] + [""]]
                lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
            lines.append("")
        if os.path.exists(os.path.join(out, f"curves_{protocol}.png")):
            lines += [f"![kNN each epoch, `{protocol}` protocol](curves_{protocol}.png)", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))


def plot_curves(table, path):
    """kNN (the monitor's subset, each method's best stage) against epoch, one line per method; anchors dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no curves: matplotlib is not installed (pip install -r benchmarks/requirements.txt)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in (r for r in table["rows"] if not r.get("seed") and r["curve"]):
        x, y = zip(*row["curve"])
        anchor = row["method"] in ANCHORS
        stage = summary(row)["best_knn"][0]
        ax.plot(x, y, "--" if anchor else "-o", markersize=3, label=f"{row['method']} ({stage})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1, % (monitor subset)")
    ax.set_title("Fashion-MNIST kNN each epoch, best stage of each trunk")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    unknown = set(args.methods) - set(METHODS + ANCHORS)
    if unknown:
        common.fail(f"unknown rows {sorted(unknown)}; pick from {METHODS + ANCHORS}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    everything = json.load(open(path)) if os.path.exists(path) else {}
    if not args.plot_only:
        code, rows = commit(), []  # the code that runs, taken before the runs
        old = everything.get(args.protocol)
        if args.update and old and old["hardware"] != hardware():  # before any run, not after hours of them
            common.fail(f"--update: the {args.protocol} table was measured on {old['hardware']}, not here; rerun it whole")
        noise = [] if args.no_noise else PROTOCOLS[args.protocol].get("noise", {}).get("methods", [])
        jobs = [(name, 0) for name in args.methods] + [(name, seed) for name in noise if name in args.methods
                                                       for seed in PROTOCOLS[args.protocol]["noise"]["seeds"]]
        for name, seed in jobs:
            start = time.time()
            results, epochs, recipe, pretrain, curve = (run_method(name, args, seed) if name in METHODS
                                                        else run_anchor(name, args))
            rows.append({"method": name, "seed": seed, "results": results, "knn_top1": results["knn_top1"],
                         "linear_top1": results.get("linear_top1"), "epochs": epochs, "seconds": time.time() - start,
                         "pretrain_seconds": pretrain, "recipe": recipe, "curve": curve, "commit": code,
                         "torch": torch.__version__})
            s = summary(rows[-1])
            print(f"== {name} seed {seed}: best kNN {s['best_knn'][0]} {fmt(s['best_knn'][1])} best linear "
                  f"{s['best_linear'][0]} {fmt(s['best_linear'][1])} final {fmt(s['knn'])} / {fmt(s['linear'])} "
                  f"({pretrain:.0f} s pretraining, {rows[-1]['seconds']:.0f} s in all)", flush=True)
        table = {"hardware": hardware(), "commit": code, "date": datetime.date.today().isoformat(),
                 "torch": torch.__version__}
        if args.update and old:  # the other methods' rows stay as they were measured, in the table's order
            for row in old["rows"]:
                row.setdefault("commit", old["commit"])
                row.setdefault("torch", old.get("torch", "?"))
            fresh, rerun = {(r["method"], r["seed"]): r for r in rows}, {r["method"] for r in rows}
            kept = [fresh.pop((r["method"], r.get("seed", 0)), None) if r["method"] in rerun else r for r in old["rows"]]
            rows = [r for r in kept if r is not None]
            at = next((i for i, r in enumerate(rows) if r["method"] in ANCHORS), len(rows))  # new methods: before the anchors
            rows = rows[:at] + list(fresh.values()) + rows[at:]
            table.update(commit=old["commit"], date=old["date"], torch=old.get("torch", "?"))
        table.update(rows=rows, minutes=sum(r["seconds"] for r in rows) / 60)
        everything[args.protocol] = table
        with open(path, "w") as f:
            json.dump(everything, f, indent=1)
    if args.protocol not in everything or "results" not in everything[args.protocol]["rows"][0]:
        common.fail(f"results.json holds no {args.protocol} table of this format; run without --plot-only first")
    plot_curves(everything[args.protocol], os.path.join(args.out, f"curves_{args.protocol}.png"))
    write_tables({k: v for k, v in everything.items() if "results" in v["rows"][0]}, args.out)
    for line in noise_band(everything[args.protocol]["rows"]):
        print(line)
    return everything[args.protocol]


if __name__ == "__main__":
    main()
