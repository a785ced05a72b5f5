"""Representation quality of every sslref method under one protocol on Fashion-MNIST, with three anchors.

    python benchmarks/run.py --protocol cpu        # resnet-tiny, 10,000 images, each method's short-run recipe
    python benchmarks/run.py --protocol gpu        # resnet18 (CIFAR stem), all 60,000 images, 2 epochs each

Each method pretrains on the training split with its own file's recipe for short runs (documented there), then
the same probes score its frozen trunk: weighted kNN (k 200, t 0.1) and a 30-epoch linear probe, trained on the
pretraining images and tested on the 10,000 test images. Anchors on the same probes: the random-init trunk, raw
pixels, and the same trunk trained with labels (cross-entropy) for as many epochs as the longest method. Writes
benchmarks/results.json (every protocol run so far) and benchmarks/results.md (its tables).
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

METHODS = ["simclr", "moco", "instdisc", "cpc", "rotation", "jigsaw", "context_encoder"]

# Each method's short-run recipe; the method file's header gives its source.
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
}

PROTOCOLS = {
    # the whole table in under 30 minutes on 2 CPU cores: about 2-3 minutes of pretraining per method
    "cpu": {"flags": ["--arch", "resnet-tiny", "--subset", "10000", "--workers", "2"],
            "epochs": {"simclr": 5, "moco": 5, "instdisc": 5, "cpc": 1, "rotation": 2, "jigsaw": 3,
                       "context_encoder": 2, "supervised": 5}},  # supervised: the most epochs any method gets
    # one H100/H200: all 60,000 images, the same number of epochs for every method, the table in about 5 minutes
    "gpu": {"flags": ["--arch", "resnet18", "--workers", str(min(16, os.cpu_count() or 1))],
            "epochs": dict.fromkeys(METHODS + ["supervised"], 2)},
    # the smoke test: two steps of batch 16 on whatever --data holds
    "smoke": {"flags": ["--arch", "resnet-tiny", "--subset", "64", "--workers", "0", "--max-steps", "2",
                        "--probe-epochs", "2"],
              "override": ["--batch-size", "16"], "method_override": {"jigsaw": ["--num-permutations", "24"]},
              "supervised_batch": 16,
              "epochs": dict.fromkeys(METHODS + ["supervised"], 1)},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", default="cpu", choices=list(PROTOCOLS))
    p.add_argument("--data", default="", help="Fashion-MNIST's idx .gz files (default: Debian's copy, else download)")
    p.add_argument("--methods", nargs="*", default=METHODS + ["random-init", "raw-pixels", "supervised"],
                   help="rows to run")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks"), help="folder of results.json / results.md")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "benchmarks"), help="the methods' output folders")
    return p.parse_args(argv)


def shared_flags(args):
    """The flags every row gets: data, protocol, probe."""
    flags = ["--dataset", "fashion-mnist", "--data", args.data, "--seed", "0", "--probe-epochs", "30",
             "--print-freq", "100"] + PROTOCOLS[args.protocol]["flags"]
    return flags


def run_method(name, args):
    module = __import__(name)
    epochs = PROTOCOLS[args.protocol]["epochs"][name]
    protocol = PROTOCOLS[args.protocol]
    override = protocol.get("override", []) + protocol.get("method_override", {}).get(name, [])
    flags = shared_flags(args) + RECIPES[name] + override + ["--epochs", str(epochs), "--out", os.path.join(args.runs, name)]
    if os.path.exists(os.path.join(args.runs, name, "checkpoint.pth")):
        os.remove(os.path.join(args.runs, name, "checkpoint.pth"))  # a fresh run, never a silent resume
    results = module.main(flags)
    return results, epochs, " ".join(RECIPES[name] + ["--epochs", str(epochs)])


def probe_setup(args, train_transform):
    """The shared flags parsed (common.add_common_args), the datasets and the probe loaders, single process."""
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, out=os.path.join(args.runs, "anchors"))
    margs = common.parse(parser, shared_flags(args))
    device = common.setup(margs)
    pretrain, probe_train, probe_test = common.build_datasets(margs, train_transform)
    loaders = (common.eval_loader(probe_train, margs), common.eval_loader(probe_test, margs))
    return margs, device, pretrain, loaders


def run_anchor(name, args):
    """random-init: the trunk as built (kaiming init); raw-pixels: the normalised image flattened; supervised: the
    same trunk trained with labels (padded random crop + flip, SGD 0.1 per 256, momentum 0.9, wd 5e-4, cosine)."""
    size = common.DEFAULT_IMAGE_SIZE["fashion-mnist"]
    train_tf = T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(),
                          common.normalize("fashion-mnist")])
    margs, device, pretrain, loaders = probe_setup(args, train_tf)
    if name == "raw-pixels":
        return common.evaluate(nn.Flatten(), *loaders, device, margs), 0, "normalised pixels, 3 x 28 x 28"
    trunk, dim = common.build_backbone(margs.arch, margs.image_size)
    trunk = trunk.to(device)
    if name == "random-init":
        return common.evaluate(trunk, *loaders, device, margs), 0, "kaiming init, BN statistics at init"
    epochs = PROTOCOLS[args.protocol]["epochs"]["supervised"]
    margs.batch_size = PROTOCOLS[args.protocol].get("supervised_batch", 128)
    head = nn.Linear(dim, int(common.dataset_labels(pretrain).max()) + 1).to(device)
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
    return common.evaluate(trunk, *loaders, device, margs), epochs, f"cross-entropy, batch {margs.batch_size}"


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


def write_tables(everything, out):
    lines = ["# Benchmark results", "",
             "Written by `benchmarks/run.py`; see the README's Results section for the protocol.", ""]
    for protocol, table in everything.items():
        lines += [f"## `{protocol}` protocol ({table['hardware']}, commit {table['commit']}, {table['date']})", "",
                  "| method | kNN top-1 | linear top-1 | epochs | wall time | recipe |", "|---|---|---|---|---|---|"]
        for row in table["rows"]:
            linear = f"{row['linear_top1']:.2f}" if row.get("linear_top1") is not None else "-"
            lines.append(f"| {row['method']} | {row['knn_top1']:.2f} | {linear} | {row['epochs']} | "
                         f"{row['seconds'] / 60:.1f} min | `{row['recipe']}` |")
        lines.append("")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    unknown = set(args.methods) - set(METHODS + ["random-init", "raw-pixels", "supervised"])
    if unknown:
        common.fail(f"unknown rows {sorted(unknown)}; pick from {METHODS + ['random-init', 'raw-pixels', 'supervised']}")
    os.makedirs(args.out, exist_ok=True)
    code = commit()  # the code that runs, taken before the runs
    rows = []
    for name in args.methods:
        start = time.time()
        results, epochs, recipe = run_method(name, args) if name in METHODS else run_anchor(name, args)
        rows.append({"method": name, "knn_top1": results["knn_top1"], "linear_top1": results.get("linear_top1"),
                     "epochs": epochs, "seconds": time.time() - start, "recipe": recipe})
        print(f"== {name}: kNN {results['knn_top1']:.2f} linear {results.get('linear_top1', float('nan')):.2f} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    path = os.path.join(args.out, "results.json")
    everything = json.load(open(path)) if os.path.exists(path) else {}
    everything[args.protocol] = {"hardware": hardware(), "commit": code, "date": datetime.date.today().isoformat(),
                                 "torch": torch.__version__, "rows": rows}
    with open(path, "w") as f:
        json.dump(everything, f, indent=1)
    write_tables(everything, args.out)
    return everything[args.protocol]


if __name__ == "__main__":
    main()
