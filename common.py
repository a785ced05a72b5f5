"""Shared plumbing of the sslref method files, in the order a run meets it; nothing method-specific.

1. Flags and one-line errors: add_common_args, parse, fail, positive_int and the other flag types
2. Processes: setup, world, rank, print0, all_reduce, gather, gather_with_grad, step_generator, stop signals
3. Data: build_datasets, Transformed, Augmentation of Views (ColorJitter, RandomGrayscale, GaussianBlur, Solarize),
   train_loader, eval_loader, dataset_labels, MEAN_STD, normalize
4. Trunks: build_backbone (torchvision ResNets; ViT, torchvision's VisionTransformer), multi_crop
5. Optimisation: LARS (and apex's LARC) and its parameter groups, cosine_lr, cosine_schedule, cosine_momentum
6. The run: Run (resume, start, after_step, done, final_evaluation), checkpoints, divergence and stop handling,
   log_metrics (metrics.jsonl, TensorBoard), plot_curves (curves.png)
7. Evaluation: evaluate (kNN, linear probe, per-stage probes, a ViT's last blocks), extract_features, knn_classify,
   linear_probe; finetune (end to end, layer_decay_groups)
8. Appendix: the tensor arithmetic of the device colour ops

A method file calls them in that order: add_common_args, parse, setup, build_datasets (with its Augmentation),
build_backbone, its optimizer, train_loader, Run; per step the schedules, Augmentation.to_device, step_generator,
Run.after_step; at the end Run.final_evaluation. Each section's heading names the `args` fields it reads."""
import argparse
import atexit
import collections
import copy
import datetime
import functools
import gzip
import json
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter  # Pillow comes with torchvision
from torchvision import transforms as T
from torchvision.transforms import functional as TF


# ==== 1. Flags and one-line errors (defines the shared flags) =========================================================
DEFAULT_IMAGE_SIZE = {"imagefolder": 224, "stl10": 96, "cifar10": 32, "cifar100": 32, "fashion-mnist": 28}


def fail(msg):
    """Stop with a one-line error that says what to do (no traceback), stop-signal handlers given back (section 2)."""
    catch_stop_signals(False)
    raise SystemExit(f"error: {msg}")


def _checked(kind, ok, what):
    """An argparse type: a bad value stops at parse time with argparse's own one-line error."""
    def parse(text):
        try:
            if ok(kind(text)):
                return kind(text)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonneg_float = _checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
unit_float = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names every flag's default; a default that other flags decide (None) is described in the flag's help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_common_args(p, method, arch="resnet50", epochs=100, batch_size=256, lr=0.1, wd=0.0, device_augment=False,
                    lr_help="base lr per 256 images; peak = lr * batch / 256", out=None,
                    arch_help="torchvision ResNet name, or resnet-tiny for CPU runs", wd_help="weight decay"):
    """The shared flags, with the file's defaults; `method` (cpc for cpc.py) is recorded in checkpoints."""
    p.set_defaults(method=method)
    p.formatter_class = HelpFormatter
    a = p.add_argument
    a("--dataset", default="imagefolder", choices=list(DEFAULT_IMAGE_SIZE), help="dataset kind")
    a("--data", default="", help="dataset folder (imagefolder: DATA/train and DATA/val; downloads: ./data when empty)")
    a("--arch", default=arch, help=arch_help)
    a("--epochs", type=positive_int, default=epochs, help="pretraining epochs")
    a("--batch-size", type=positive_int, default=batch_size, help="GLOBAL batch size, split over ranks")
    a("--lr", type=nonneg_float, default=lr, help=lr_help)
    a("--wd", type=nonneg_float, default=wd, help=wd_help)
    a("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1), help="data-loading workers per rank")
    if device_augment:
        a("--device-augment", action=argparse.BooleanOptionalAction, default=True,
          help="colour ops batched on the training device (no: PIL in the data workers)")
    a("--seed", type=int, default=0, help="seed of model init, data order, augmentations and training step")
    a("--image-size", type=nonneg_int, default=0, help="crop size (0: the dataset's default)")
    a("--subset", type=nonneg_int, default=0, help="use N evenly spaced training images (0: all)")
    a("--max-steps", type=nonneg_int, default=0, help="stop (and checkpoint) after N steps in total (0: never)")
    a("--save-every", type=nonneg_int, default=0, help="also checkpoint every N steps (0: at each epoch end only)")
    a("--out", default=out or os.path.join("runs", method), help="output folder: metrics.jsonl, checkpoint.pth, backbone.pth")
    a("--resume", default="", help="checkpoint.pth to continue from (or backbone.pth with --eval-only)")
    a("--eval-only", action="store_true", help="only evaluate (the --resume weights, else random init)")
    a("--baselines", action="store_true", help="also probe the random-init trunk and raw pixels (<= 64 px)")
    a("--knn-k", type=positive_int, default=200, help="neighbours of the weighted kNN")
    a("--knn-t", type=positive_float, default=0.1, help="temperature of the weighted kNN")
    a("--probe-epochs", type=nonneg_int, default=100, help="epochs of the linear probe (0: kNN only)")
    a("--probe-lars", action="store_true", help="the linear probe with SimSiam's main_lincls optimiser: LARS (trust 0.001) "
      "at batch 4096, lr 1.6 (for ImageNet-sized sets: a few thousand rows give it too few steps)")
    a("--probe-blocks", type=positive_int, default=1, help="ViT: the probes read the class tokens of the last N blocks, "
      "each after the final LayerNorm, concatenated (DINO's eval_linear.py: 4 for ViT-S, 1 for its kNN)")
    a("--probe-stages", action="store_true",
      help="also probe the stem and each residual stage, average-pooled to about 4.5 x the final width")
    a("--finetune-epochs", type=nonneg_int, default=0, help="also fine-tune a copy of the trunk end to end with a new "
      "linear head on the labelled training images (MAE's main_finetune recipe) and report its top-1 (0: off)")
    a("--finetune-batch-size", type=positive_int, default=1024, help="fine-tuning's GLOBAL batch size")
    a("--finetune-lr", type=nonneg_float, default=5e-4, help="fine-tuning's base lr per 256 images (AdamW)")
    a("--finetune-warmup-epochs", type=nonneg_float, default=5, help="fine-tuning's linear lr warm-up")
    a("--finetune-mixup", type=nonneg_float, default=0.8, help="fine-tuning's MixUp alpha (0: off)")
    a("--finetune-cutmix", type=nonneg_float, default=1.0, help="fine-tuning's CutMix alpha (0: off); with both on, "
      "one of the two per batch")
    a("--layer-decay", type=unit_float, default=0.65, help="fine-tuning a ViT: the lr of block i (from 0) is scaled "
      "by layer_decay ** (depth - i), the patch and position embeddings' by layer_decay ** (depth + 1)")
    a("--eval-every", type=nonneg_int, default=0, help="kNN monitor every N epochs (0: only at the end)")
    a("--monitor-subset", type=nonneg_int, default=0,
      help="the monitor's kNN on N class-balanced images of each probe set (0: all)")
    a("--print-freq", type=positive_int, default=50, help="progress line every N steps")
    a("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--tensorboard", action="store_true",
      help="also write metrics.jsonl's numbers as TensorBoard event files to OUT/tensorboard (pip install tensorboard)")


def parse(p, argv):
    args = p.parse_args(argv)
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.dataset]
    if args.probe_blocks > 1 and args.arch not in VIT:
        fail(f"--probe-blocks {args.probe_blocks} reads a ViT's blocks; --arch {args.arch} has none (drop the flag)")
    if args.tensorboard:  # an optional package: without it the run stops here, not after training
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (1.5 s: only runs with the flag pay it)
        except ImportError:
            fail("--tensorboard needs the tensorboard package; pip install tensorboard, or drop --tensorboard")
    return args


# ==== 2. Processes: start-up, ranks, gathers, stop signals. Reads args.batch_size, seed, out, amp ======================
def setup(args):
    """Process group (torchrun: NCCL on GPU, gloo on CPU), seeds, a writable --out, bf16 by default on CUDA -> device."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda and local_rank >= torch.cuda.device_count():
            fail(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower --nproc_per_node")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.batch_size % world():
        fail(f"--batch-size {args.batch_size} is not divisible by the world size {world()}; use a multiple of {world()}")
    args.amp = cuda if args.amp is None else args.amp
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:  # every rank, before any data is read: a run that cannot checkpoint must not start
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        fail(f"cannot write to --out {args.out} ({e.strerror or e}); pick a folder this user can write")
    if device.type == "cuda":
        sys.excepthook = functools.partial(out_of_memory_line, args, sys.excepthook)
    return device


def out_of_memory_line(args, hook, kind, error, traceback):
    """sys.excepthook on CUDA: out of memory becomes one line (the per-GPU batch, what it needed, what to change)."""
    if not isinstance(error, torch.cuda.OutOfMemoryError):
        return hook(kind, error, traceback)
    tried = re.search(r"Tried to allocate ([\d.]+) ([KMG])iB", str(error))  # the allocation that failed
    device = torch.cuda.current_device()
    needed = torch.cuda.max_memory_allocated(device) / 2 ** 30 + (
        float(tried[1]) * 1024.0 ** ("KMG".index(tried[2]) - 2) if tried else 0)
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    print(f"error: CUDA out of memory at --batch-size {args.batch_size} ({args.batch_size // world()} per GPU): it "
          f"needed about {needed:.1f} GiB of the GPU's {total:.1f} GiB; lower --batch-size (scale --lr as the file's "
          "header says), use more GPUs, or a smaller --arch or --image-size", file=sys.stderr, flush=True)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world():
    return dist.get_world_size() if is_distributed() else 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def print0(*a):
    if rank() == 0:
        print(*a, flush=True)


def hms(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def all_reduce(x, op="sum"):
    """x reduced over the ranks: "sum", "mean", "max" or "min" (a copy; x itself in one process)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=getattr(dist.ReduceOp, "SUM" if op == "mean" else op.upper()))
    return x / world() if op == "mean" else x


@torch.no_grad()
def gather(x):
    """All-gather along dim 0, no gradient."""
    if not is_distributed():
        return x
    x = x.contiguous()  # all_gather wants dense tensors of one layout (channels_last images become NCHW)
    out = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(out, x)
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    forward = staticmethod(lambda ctx, x: gather(x))

    @staticmethod
    def backward(ctx, grad):  # every rank's loss used every slice: sum their gradients, take ours (lightly#1528)
        grad, n = all_reduce(grad.contiguous()), len(grad) // world()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x):
    """All-gather along dim 0; backward sends each rank the sum of all ranks' gradients for its slice."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def step_generator(seed, global_step, device):
    """The step's own generator, from (seed, step): a resumed run draws the same numbers, whatever --workers is."""
    return torch.Generator(device).manual_seed(hash((seed, global_step)) & 0x7FFF_FFFF_FFFF_FFFF)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # schedulers send one some seconds before a kill
# A stop signal is acknowledged at once and acted on at the end of a step. One process reads its own flag after every
# step (no device value, no sync). Ranks must stop at the same step, so they agree at checks: one all-reduce of two
# numbers (a rank's signal, the seconds since the last check) and its host sync (0.7 ms with gloo on 2 CPU ranks),
# which also sets the steps to the next check: every STOP_CHECK_EVERY steps, or sooner so that checks come about
# STOP_CHECK_SECONDS apart when steps are slow (every step once a step takes longer).
STOP_CHECK_EVERY, STOP_CHECK_SECONDS = 10, 2.0
_stop = {"signal": 0, "handlers": {}, "step": 0, "every": 1}  # the signal received (0: none), the handlers replaced,
# and for the acknowledgement the step in progress and the steps between checks


def _on_stop_signal(signum, frame):
    """A stop signal while training: noted (a repeat changes nothing: torchrun passes a scheduler's signal on, so a rank
    may get it twice) and acknowledged on rank 0 (os.write: a print could land inside another print)."""
    if not _stop["signal"]:
        _stop["signal"], name = signum, signal.Signals(signum).name
        said = f"stop requested by {name}; checkpointing at the end of step {_stop['step']}, then exiting" if not \
            is_distributed() else (f"stop requested by {name} in step {_stop['step']}; the ranks agree on it at their next "
                                   f"check (every {_stop['every']} steps), then checkpoint and exit")
        if rank() == 0:
            os.write(2, (said + "\n").encode())


def catch_stop_signals(on):
    """On (training): a stop signal only sets _stop; off: the handlers as they were."""
    if on and not _stop["handlers"] and threading.current_thread() is threading.main_thread():  # Python's rule
        _stop.update(signal=0, every=1)
        _stop["handlers"] = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    elif not on:
        for s, handler in _stop["handlers"].items():
            signal.signal(s, handler)
        _stop["handlers"] = {}


def stop_if_requested(device, step, checkpoint, save, steps_since, seconds_since):
    """If a rank got a stop signal, every rank at this same step: save() (rank 0 writes `checkpoint`), say how to go on,
    exit with 128 + the signal. -> steps to the next check, the same on every rank."""
    if is_distributed():
        agreed = all_reduce(torch.tensor([_stop["signal"], seconds_since], device=device), "max").tolist()
        signum, seconds_per_step = int(agreed[0]), agreed[1] / steps_since
        _stop["every"] = max(1, min(STOP_CHECK_EVERY, int(STOP_CHECK_SECONDS / max(seconds_per_step, 1e-9))))
    else:
        signum = _stop["signal"]
    if signum:
        save()
        if is_distributed():
            dist.barrier()  # no rank exits before the file is written: torchrun would end rank 0 with it
        catch_stop_signals(False)
        if rank() == 0:
            print(f"stopped by {signal.Signals(signum).name} at step {step}; continue with --resume {checkpoint}",
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    return _stop["every"]


# ==== 3. Data: datasets, views, loaders. Reads args.dataset, data, image_size, subset, seed, batch_size, workers, ===
# monitor_subset
MEAN_STD = {  # per-channel statistics used by Normalize
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "stl10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DOWNLOAD_TIMEOUT = datetime.timedelta(hours=2)  # STL-10 is 2.6 GB


def build_datasets(args, train_transform):
    """Pretraining set (augmented, keyed by epoch) and the two probe sets (deterministic)."""
    if args.dataset == "imagefolder" and not os.path.isdir(args.data):
        fail(f"--data '{args.data}' does not exist; point it at a folder with train/ and val/ (the ImageNet layout)")
    # a downloadable set: rank 0 downloads and extracts alone, then the others read its files. They wait in a barrier of
    # their own on the CPU (gloo) with a long timeout: NCCL's 10 minutes can pass during a first download
    downloads = is_distributed() and args.dataset != "imagefolder"
    waiting = dist.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT) if downloads else None
    if waiting and rank() > 0:
        dist.barrier(group=waiting)
    root = args.data or "./data"
    pretrain, probe_train, probe_test = base_datasets(args.dataset, root)
    if waiting and rank() == 0:
        dist.barrier(group=waiting)
    if args.subset:  # evenly spaced, so a class-ordered folder keeps every class
        pretrain, probe_train = (torch.utils.data.Subset(ds, range(0, len(ds), max(1, len(ds) // args.subset))
                                                         [:args.subset]) for ds in (pretrain, probe_train))
    for split, ds in (("training", pretrain), ("probe test", probe_test)):
        if len(ds) == 0:
            fail(f"the {split} split of {args.dataset} at {root} is empty")
    test_tf = eval_transform(args.dataset, args.image_size)
    return (Transformed(pretrain, train_transform, args.seed), Transformed(probe_train, test_tf),
            Transformed(probe_test, test_tf))


def base_datasets(name, root):
    """(pretrain, probe_train, probe_test) datasets yielding (PIL image, label), untransformed."""
    D = torchvision.datasets
    if name == "imagefolder":
        train, val = image_folder(root, "train"), image_folder(root, "val")
        if train.classes != val.classes:  # ImageFolder numbers classes by sorted name: val's labels would be train's others
            only = [sorted(set(a.classes) - set(b.classes)) for a, b in ((train, val), (val, train))]
            listed = [", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "none"
                      for names in only]
            fail(f"train/ and val/ under {root} have different class folders (only in train/: {listed[0]}; only in "
                 f"val/: {listed[1]}); the probes need the same classes in both: add or remove folders")
        return train, train, val
    if name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        files = f"{cls.filename} (from {cls.url})"
        train = download(cls, root, files, train=True)
        return train, train, download(cls, root, files, train=False)
    if name == "stl10":  # pretrains on train+unlabeled (105k images), probes on the 5k labelled train
        files = f"{D.STL10.filename} (from {D.STL10.url})"
        return tuple(download(D.STL10, root, files, split=s) for s in ("train+unlabeled", "train", "test"))
    train = fashion_mnist(root, "train")
    return train, train, fashion_mnist(root, "test")


def download(dataset_cls, root, files, **kwargs):
    try:
        return dataset_cls(root, download=True, **kwargs)
    except Exception as e:  # offline, or a partial/corrupt archive
        fail(f"could not download {dataset_cls.__name__} into {root} ({e}); place {files} there by hand and rerun")


def image_folder(root, split):
    path = os.path.join(root or "", split)
    if not os.path.isdir(path):
        fail(f"no folder {path}: --dataset imagefolder expects DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg; "
             "check --data or pick another --dataset")
    try:
        return torchvision.datasets.ImageFolder(path, loader=functools.partial(decode_image, root=root))
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{path} holds no images in class folders ({e})")


class BadImage(Exception):
    """An image file that does not decode; the loaders turn it into a one-line error."""


def decode_image(path, root):
    """ImageFolder's PIL loader (RGB); an image PIL cannot decode raises BadImage, named relative to --data."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # truncated, not an image, corrupt headers
        raise BadImage(f"cannot decode {os.path.relpath(path, root)} under --data ({e}); replace or delete it") from None


def fashion_mnist(root, split):
    """Zalando's idx .gz files from --data, torchvision's raw folder or Debian's package; else download."""
    names = FASHION_FILES[split]
    for folder in [root, os.path.join(root, "FashionMNIST", "raw"), DEBIAN_FASHION_MNIST]:
        if all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return ArrayDataset(*(read_idx_gz(os.path.join(folder, name)) for name in names))
    all_files = ", ".join(name for pair in FASHION_FILES.values() for name in pair)
    ds = download(torchvision.datasets.FashionMNIST, root, all_files, train=split == "train")
    return ArrayDataset(ds.data.numpy(), ds.targets.tolist())


def read_idx_gz(path):
    """An idx file (the MNIST format: a magic number ending in the rank, the sizes, uint8 data) -> numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3]))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images (N, H, W[, 3]) + labels -> (PIL RGB image, label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, [int(y) for y in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return TF.to_pil_image(self.images[i]).convert("RGB"), self.labels[i]


def normalize(dataset):
    return T.Normalize(*MEAN_STD[dataset])


def eval_transform(dataset, image_size):
    """Deterministic transform for probing: resize + center crop (256/224 ratio for large images)."""
    resize = int(round(image_size * 256 / 224)) if image_size >= 128 else image_size
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize(dataset)])


class Transformed(torch.utils.data.Dataset):
    """(transform(image), label, index). A key (index, epoch) from EpochSampler seeds the augmentation with
    (seed, epoch, index): the same views whatever the number of workers, so --resume continues exactly."""

    def __init__(self, base, transform, seed=0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        image, label = self.base[index]
        if epoch is None:
            return self.transform(image), label, index
        # torchvision's random transforms draw from torch's CPU generator: seed it for this sample, then give it back
        # as it was, so that with --workers 0 the training step's randomness stays its own
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(image), label, index


def dataset_labels(ds):
    """Labels of a dataset from build_datasets, in index order, without loading an image (-1: unlabelled)."""
    if isinstance(ds, Transformed):
        return dataset_labels(ds.base)
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_labels(ds.dataset)[torch.tensor(list(ds.indices))]
    return torch.as_tensor(np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels), dtype=torch.long)


def balanced_subset(labels, n):
    """n / classes indices (at least one) spread evenly over each class's samples, sorted: the same on every rank."""
    per_class, picked = max(1, n // len(labels.unique())), []
    for c in labels.unique():
        members = (labels == c).nonzero()[:, 0]
        picked.append(members[torch.linspace(0, len(members) - 1, min(per_class, len(members))).round().long()])
    return torch.cat(picked).sort().values.tolist()


# Augmentation: the data workers decode each image once, apply each view's geometry (crops, flips: PIL) and draw every
# parameter of its photometric ops from the per-sample seed (torchvision's get_params: the same distributions); they
# hand uint8 tensors over. The device then applies the colour ops to the whole batch, each sample with its own
# parameters, and normalises; with on_device=False (--no-device-augment) the workers apply them with PIL instead, as
# the official loaders. Each op has draw() (in the worker), pil(image, q) (the CPU path) and batch(x, q) (x: (B, 3, H,
# W) floats in [0, 1], owned and overwritten on CPU; q: (B, params)), its tensor arithmetic in the appendix. Views are
# declared in groups (Views): the views of a group share their ops and size (BYOL's two views: a group each, their
# blur and solarize probabilities differing; multi-crop: 2 global and N local views, a group per size).
class Views:
    """`count` views drawn alike: `geometry` (PIL transforms ending at the group's size) then `photometric` ops."""

    def __init__(self, count, geometry, photometric=()):
        self.count, self.geometry, self.photometric = count, T.Compose(geometry), list(photometric)
        self.sizes = [op.params for op in self.photometric]


class Augmentation:
    """image -> per group (uint8 views (V, 3, S, S), their photometric ops' parameters (V, P)); to_device finishes a
    batch of them."""

    def __init__(self, dataset, on_device=True, groups=()):
        self.groups, self.on_device, self.dataset, self.mean_std = list(groups), on_device, dataset, {}

    def __call__(self, image):
        out = []
        for group in self.groups:
            images, params = [], []
            for _ in range(group.count):
                view, q = group.geometry(image), [op.draw() for op in group.photometric]
                for op, qi in zip(group.photometric, q) if not self.on_device else ():  # the CPU path: PIL, same draws
                    view = op.pil(view, qi)
                images.append(TF.pil_to_tensor(view))
                params.append(torch.cat(q) if q else torch.zeros(0))
            out.append((torch.stack(images), torch.stack(params)))
        return out

    def to_device(self, batch, device):
        """Per group (uint8 (B, V, 3, S, S), params (B, V, P)) -> per group (V B, 3, S, S) on the device, view-major,
        coloured, normalised."""
        return [self.finish(group, *batch_group, device) for group, batch_group in zip(self.groups, batch)]

    def finish(self, group, x, params, device):
        x, params = (t.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1) for t in (x, params))
        x = x.float().div_(255)
        if self.on_device and group.photometric:  # on CPU 8 views at a time, so they stay in cache
            chunk, parts = 8 if device.type == "cpu" else len(x), []
            for s in range(0, len(x), chunk):
                y = x[s:s + chunk]
                for op, q in zip(group.photometric, params[s:s + chunk].split(group.sizes, 1)):
                    y = op.batch(y, q)
                parts.append(y)
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if device not in self.mean_std:  # copied to the device once, not every step (a copy waits for the GPU)
            self.mean_std[device] = [torch.tensor(v, device=device)[:, None, None] for v in MEAN_STD[self.dataset]]
        x = x.sub_(self.mean_std[device][0]).div_(self.mean_std[device][1])
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


class ColorJitter:
    """T.ColorJitter inside T.RandomApply(p): brightness, contrast, saturation and hue in a random order per sample.
    Parameters: [applied, order (4), b, c, s, h]."""
    params = 9

    def __init__(self, brightness, contrast, saturation, hue, p=1.0):
        self.jitter, self.p = T.ColorJitter(brightness, contrast, saturation, hue), p  # its range checks and bounds

    def draw(self):
        if torch.rand(1) > self.p:  # T.RandomApply: applied when rand <= p
            return torch.tensor([0.0, 0, 1, 2, 3, 1, 1, 1, 0])
        j = self.jitter
        order, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        factors = [(0.0 if i == 3 else 1.0) if f is None else f for i, f in enumerate(factors)]  # None: unjittered
        return torch.tensor([1.0, *order.tolist(), *factors])

    def pil(self, image, q):
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in q[1:5].long().tolist() if q[0] else []:
            image = adjust[i](image, q[5 + i].item())
        return image

    def batch(self, x, q):
        """Brightness, contrast and saturation are torchvision's blends with 0, the mean grey level or the grey image;
        hue shifts the HSV hue, once per sample: the ops before it, hue, the ops after it."""
        order, factors = torch.where(q[:, :1] > 0, q[:, 1:5].long(), -1), q[:, 5:]  # not applied: every slot empty
        hue_at = (order == 3).int().argmax(1)  # (B,); 0 when not applied
        for slot in range(3):  # up to three ops before the hue
            x = _where(x, (slot < hue_at), _blend_slot, order[:, slot], factors)
        x = _where(x, (order[:, 0] >= 0) & (factors[:, 3] != 0), _adjust_hue, factors[:, 3])  # hue 0: no jitter
        for slot in range(1, 4):  # and after it
            x = _where(x, (slot > hue_at) & (order[:, 0] >= 0), _blend_slot, order[:, slot], factors)
        return x


class RandomGrayscale:
    """T.RandomGrayscale(p): the grey image in all three channels. Parameters: [applied]."""
    params = 1

    def __init__(self, p):
        self.p = p

    def draw(self):
        return torch.tensor([float(torch.rand(1) < self.p)])

    def pil(self, image, q):  # PIL's convert("L") rounds the luma to 8 bits
        return TF.rgb_to_grayscale(image, num_output_channels=3) if q[0] else image

    def batch(self, x, q):
        return _where(x, q[:, 0] > 0, lambda x: _grey(x).expand_as(x).contiguous())


class GaussianBlur:
    """T.GaussianBlur(kernel_size, sigma) inside T.RandomApply(p); sigma uniform in [sigma_min, sigma_max]
    (get_params). Parameters: [applied, sigma]. The device convolves rows then columns with the kernel_size-tap kernel
    (reflect padding), which equals torchvision's 2-D kernel; the PIL path is the official MoCo loader's
    ImageFilter.GaussianBlur(radius=sigma), an untruncated Gaussian (three box blurs)."""
    params = 2

    def __init__(self, kernel_size, sigma=(0.1, 2.0), p=1.0):
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def draw(self):
        return torch.tensor([1.0, T.GaussianBlur.get_params(*self.sigma)] if torch.rand(1) <= self.p else [0.0, 1.0])

    def pil(self, image, q):
        return image.filter(ImageFilter.GaussianBlur(radius=q[1].item())) if q[0] else image

    def batch(self, x, q):
        return _where(x, q[:, 0] > 0, self.blur, q[:, 1])

    def blur(self, x, sigma):  # rows then columns: 2 (2r + 1) multiply-adds a pixel, not (2r + 1)^2
        (B, C, H, W), r = x.shape, self.kernel_size // 2
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        kernel = (-0.5 * (t / sigma[:, None]) ** 2).exp()
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B C, 2r + 1): a group per channel
        y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, kernel[:, None, None], groups=B * C)
        return F.conv2d(y, kernel[:, None, :, None], groups=B * C).view(B, C, H, W)


class Solarize:
    """Solarize inside T.RandomApply(p): a channel value at or above `threshold` becomes 1 - value (BYOL's 0.5 of [0,
    1], PIL's 128 of 255: the same uint8 pixels). Parameters: [applied]."""
    params = 1

    def __init__(self, p, threshold=0.5):
        self.p, self.threshold = p, threshold

    def draw(self):
        return torch.tensor([float(torch.rand(1) < self.p)])

    def pil(self, image, q):
        return TF.solarize(image, math.ceil(self.threshold * 255)) if q[0] else image

    def batch(self, x, q):
        return _where(x, q[:, 0] > 0, lambda x: torch.where(x >= self.threshold, 1 - x, x))


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler that yields (index, epoch) keys and can start mid-epoch (for --resume)."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_step = batch_size, 0

    def __iter__(self):
        return iter([(i, self.epoch) for i in list(super().__iter__())[self.start_step * self.batch_size:]])

    def __len__(self):
        return super().__len__() - self.start_step * self.batch_size


def _ignore_stop_signals(worker_id):
    """Data workers leave SIGTERM, SIGINT and SIGUSR1 to the main process, which finishes its step and checkpoints
    (a scheduler signals every process of the job; a worker dying first would end the run with a traceback)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit hook was registered (torch imports it), so it runs before it
def _end_data_workers():
    """At exit: the loaders' workers (which ignore multiprocessing's SIGTERM) shut down as DataLoader does, or killed."""
    for loader in list(Loader.instances):
        if getattr(loader, "_iterator", None) is not None and hasattr(loader._iterator, "_shutdown_workers"):
            loader._iterator._shutdown_workers()
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class Loader(torch.utils.data.DataLoader):
    """DataLoader whose undecodable image stops the run with one line (a worker re-raises it with its traceback)."""

    instances = weakref.WeakSet()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=_ignore_stop_signals, **kwargs)
        Loader.instances.add(self)

    def __iter__(self):
        try:
            yield from super().__iter__()
        except BadImage as e:
            fail(str(e).strip().splitlines()[-1].split("BadImage: ")[-1])


def train_loader(dataset, args):
    """-> (loader, sampler): this rank's batches of --batch-size / world, keyed for the per-sample seed."""
    sampler = EpochSampler(dataset, args.batch_size // world(), num_replicas=world(), rank=rank(), shuffle=True,
                           seed=args.seed, drop_last=True)
    if len(sampler) < sampler.batch_size:
        fail(f"{len(dataset)} training images give no full batch of {args.batch_size}; lower --batch-size or "
             "raise --subset")
    return Loader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0), sampler


def eval_loader(dataset, args):
    """This rank's share of `dataset`, in order: every world-th sample from its rank, each sample on one rank only
    (ImageNet, ResNet-50, 8 ranks: 1.28M x 2048 features in bf16 are 0.66 GB a GPU, not 10.5 GB in fp32 on every one)."""
    return Loader(dataset, batch_size=max(1, args.batch_size // world()), sampler=range(rank(), len(dataset), world()),
                  num_workers=args.workers, pin_memory=torch.cuda.is_available())


def probe_loaders(probe_sets, args):
    """-> (final, monitor): the loaders of the final evaluation (every image) and of the --eval-every kNN monitor, which
    with --monitor-subset reads a fixed, class-balanced part of each probe set (seconds on ImageNet, not a full pass)."""
    final = [eval_loader(ds, args) for ds in probe_sets]
    if not args.monitor_subset:
        return final, final
    return final, [eval_loader(torch.utils.data.Subset(ds, balanced_subset(dataset_labels(ds), args.monitor_subset)),
                               args) for ds in probe_sets]


# ==== 4. Trunks. Reads no args: a file passes --arch and --image-size ================================================
def build_backbone(arch, image_size, zero_init_residual=False, norm_layer=nn.BatchNorm2d, vit=False, drop_path=0.0,
                   heads=None):
    """torchvision ResNet (its Kaiming fan-out init) without fc -> (trunk, width). At <= 64 px the CIFAR stem
    (3x3 conv, stride 1, no max-pool) as SimCLR's CIFAR setup; zero_init_residual zeroes each block's last BN.
    resnet-tiny: BasicBlock, one block per stage, widths 16-32-64-128, for CPU smoke runs. vit=True: a file whose
    paper trains Vision Transformers also takes the VIT archs (ViT, with drop_path; heads: another number of attention
    heads than VIT's, as MoCo v3's ViT-S with 12)."""
    from torchvision.models.resnet import BasicBlock
    if arch in VIT and vit:
        return ViT(arch, image_size, drop_path, heads), VIT[arch][1]
    if arch in VIT:
        fail(f"--arch {arch}: this method is defined on ResNets (its paper's trunks); use a torchvision ResNet "
             "(resnet50, resnet18, ...) or resnet-tiny")
    if arch == "resnet-tiny":
        net = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
        net.inplanes, net.conv1, net.bn1 = 16, nn.Conv2d(3, 16, 7, 2, 3, bias=False), norm_layer(16)
        net.layer1, net.layer2, net.layer3, net.layer4 = (  # built in order: each reads net.inplanes
            net._make_layer(BasicBlock, width, 1, stride=1 if width == 16 else 2) for width in (16, 32, 64, 128))
        net.fc = nn.Linear(128, 1000)
        for m in net.modules():  # torchvision's own initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if zero_init_residual and isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    elif arch.startswith(("resnet", "wide_resnet", "resnext")) and hasattr(torchvision.models, arch):
        net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    else:
        fail(f"unknown --arch {arch}: use a torchvision ResNet (resnet18, resnet50, ...) or resnet-tiny"
             + (", or " + ", ".join(VIT) if vit else ""))
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    width, net.fc = net.fc.in_features, nn.Identity()
    return net, width


# Vision Transformers: (patch, width, depth, heads, MLP width). vit-small is DINO's ViT-S/16 (vision_transformer.py
# vit_small), vit-base torchvision's vit_b_16; vit-tiny is for CPU runs at 28-32 px (7x7 or 8x8 patches)
VIT = {"vit-tiny": (4, 96, 4, 3, 384), "vit-small": (16, 384, 12, 6, 1536), "vit-base": (16, 768, 12, 12, 3072)}


class Block(torchvision.models.vision_transformer.EncoderBlock):
    """torchvision's EncoderBlock (pre-norm attention, then the MLP) with drop path on both residual branches: each
    sample's branch kept with probability 1 - rate and then divided by it (DINO's drop_path, torchvision's
    StochasticDepth "row"), its draws from `generator` (ViT.draw_from) when set, else from torch's global RNG."""
    generator = None

    def __init__(self, heads, width, mlp, drop_path):
        super().__init__(heads, width, mlp, 0.0, 0.0, functools.partial(nn.LayerNorm, eps=1e-6))
        self.rate = float(drop_path)

    def drop_path(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = torch.rand(len(x), 1, 1, generator=self.generator, device=x.device) < 1 - self.rate
        return x * keep.to(x.dtype) / (1 - self.rate)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.drop_path(self.dropout(self.self_attention(y, y, y, need_weights=False)[0]))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class ViT(torchvision.models.VisionTransformer):
    """torchvision's VisionTransformer, its parameters and init, without a head: the class token after the final
    LayerNorm is the feature. Its forward adds what DINO's ViT has and torchvision's lacks: the position embedding
    interpolated for inputs of another size (96 px crops through a ViT built for 224), and drop path (stochastic
    depth) on each residual branch, the rate rising linearly over the blocks to drop_path (DINO's dpr)."""

    def __init__(self, arch, image_size, drop_path=0.0, heads=None):
        patch, width, depth, default_heads, mlp = VIT[arch]
        heads = heads or default_heads
        if image_size % patch:
            fail(f"--image-size {image_size} is not a multiple of {arch}'s patch size {patch}")
        super().__init__(image_size, patch, depth, heads, width, mlp)
        self.heads = nn.Identity()
        self.encoder.layers = nn.Sequential(collections.OrderedDict(  # torchvision's block names and init
            (f"encoder_layer_{i}", Block(heads, width, mlp, r)) for i, r in enumerate(torch.linspace(0, drop_path, depth))))

    def draw_from(self, generator):
        """Drop path's draws from `generator` (a run's step generator: a resumed run draws the same); None: torch's."""
        for block in self.encoder.layers:
            block.generator = generator

    def position_embedding(self, h, w):
        """DINO's interpolate_pos_encoding: the patch rows resized bicubically to an h x w grid (the 0.1 added to the
        sizes as DINO's, so the scale factor's rounding gives h x w), the class token's row kept."""
        pos = self.encoder.pos_embedding
        side = math.isqrt(pos.shape[1] - 1)
        if h == side and w == side:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], 1)

    def forward(self, x):
        """(B, 3, H, W), H and W multiples of the patch size -> the class token (B, width)."""
        x = self.conv_proj(x)  # (B, width, H / patch, W / patch)
        pos = self.position_embedding(*x.shape[2:])
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + pos
        return self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))[:, 0]


def multi_crop(trunk, crops):
    """The trunk's features of a list of crop batches, concatenated in order, with one forward per run of consecutive
    batches of one size (DINO's MultiCropWrapper, SwAV's forward_backbone): BN statistics per resolution, as theirs."""
    out, start = [], 0
    for end in range(1, len(crops) + 1):
        if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
            out.append(trunk(torch.cat(crops[start:end]) if end - start > 1 else crops[start]))
            start = end
    return torch.cat(out)


# ==== 5. Optimisation: LARS, per-step schedules. Reads no args: a file passes its recipe's numbers ====================
class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio eta ||w|| / ||g + wd w|| (You et al. 2017), weight decay added to
    the gradient first; groups with exclude=True get neither (they still get momentum and the lr). lr_in_momentum: the
    lr scales the update before it enters the momentum buffer (v = m v + lr u, w -= v: SimCLR's TF momentum
    optimizer), else after it (v = m v + u, w -= lr v: BYOL's optax chain); they differ while the lr changes.
    larc: apex's LARC around SGD (clip off; SwAV's): the ratio eta ||w|| / (||g|| + wd ||w|| + 1e-8) times g + wd w,
    and neither the ratio nor weight decay for a parameter whose weight or gradient is zero."""

    def __init__(self, params, lr, weight_decay, momentum=0.9, eta=0.001, lr_in_momentum=False, larc=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, exclude=False))
        self.lr_in_momentum, self.larc = lr_in_momentum, larc

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if self.larc:
                    wd, w_norm, g_norm = group["weight_decay"], p.norm(), update.norm()
                    ok = (w_norm > 0) & (g_norm > 0)
                    update = (update + p * (wd * ok)) * torch.where(ok, group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8), 1.0)
                elif not group["exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                if self.lr_in_momentum:
                    p.sub_(buf.mul_(group["momentum"]).add_(update, alpha=group["lr"]))
                else:
                    p.sub_(buf.mul_(group["momentum"]).add_(update), alpha=group["lr"])


def lars_groups(model, excluded=lambda p: p.ndim <= 1):
    """The trainable parameters in two LARS groups: those `excluded` from weight decay and adaptation (by default the
    one-dimensional ones, every bias and norm scale: SimCLR's, BYOL's, Barlow Twins' and VICReg's rule) and the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if not excluded(p)]},
            {"params": [p for p in params if excluded(p)], "exclude": True}]


def cosine_lr(step, total_steps, warmup_steps, peak, end=0.0):
    """Per step: linear warm-up from 0 to `peak` over warmup_steps, then a cosine from `peak` down to `end`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cosine_schedule(step, total_steps, warmup_steps, base, final, start=0.0):
    """DINO's utils.cosine_scheduler at one step, SwAV's lr schedule too: np.linspace(start, base, warmup_steps) (its
    last value is base), then final + (base - final)(1 + cos(pi t / (total_steps - warmup_steps))) / 2 over t = 0, 1..."""
    if step < warmup_steps:
        return start + (base - start) * step / max(1, warmup_steps - 1)
    t = min(step - warmup_steps, total_steps - warmup_steps)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t / max(1, total_steps - warmup_steps)))


def cosine_momentum(step, total_steps, m0):
    """A target network's momentum at step k of K: 1 - (1 - m0) (cos(pi k / K) + 1) / 2, from m0 to 1 (BYOL Sec. 3.2)."""
    return 1 - (1 - m0) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


# ==== 6. The run: checkpoints, resume, progress, divergence, stops. Reads args.out, resume, eval_only, epochs, ====
# max_steps, save_every, print_freq, eval_every, baselines, batch_size, tensorboard; method, arch, image_size
# (backbone.pth's recipe; checkpoints record all of args); finetune_epochs, finetune_batch_size (checked at the start)
def save_atomic(obj, path):
    """torch.save to a temp file then rename: a crash mid-write never leaves a broken file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def load_weights(module, state_dict, path):
    """module.load_state_dict(state_dict), or one short line with torch's first complaint about it."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        said = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        problem = next((line for line in said if line.startswith("size mismatch")), said[0])  # the shape, if one differs
        fail(f"{path} does not fit this model ({problem[:160]}); pass the --arch, --image-size and model flags it was "
             "trained with")


def read_checkpoint(args, trunk):
    """The --resume file, checked: a training checkpoint written by this file with this --arch and --image-size (and,
    stopped mid-epoch, the same ranks and batch) -> its dict; with --eval-only a backbone.pth is loaded into `trunk`
    instead (-> None, as without --resume)."""
    if not args.resume:
        return None
    if not os.path.isfile(args.resume):
        fail(f"--resume {args.resume} does not exist")
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {args.resume} ({type(e).__name__}); it is truncated or corrupt: resume from "
             "another checkpoint or start afresh without --resume")
    if not isinstance(ckpt, dict):
        fail(f"{args.resume} holds no weights; pass OUT/checkpoint.pth or OUT/backbone.pth")
    if "model" not in ckpt:
        if not args.eval_only:
            fail(f"{args.resume} is not a training checkpoint; pass OUT/checkpoint.pth (backbone.pth needs --eval-only)")
        return load_weights(trunk, ckpt, args.resume)
    written, ours = ckpt.get("args", {}), vars(args)
    keys = [k for k in ("method", "arch", "image_size") if k in written]  # the method: since it was recorded
    if any(written[k] != ours[k] for k in keys):
        describe = lambda a: f"{a['method']}.py" * ("method" in keys) + f" --arch {a['arch']} --image-size {a['image_size']}"
        fail(f"{args.resume} was written by {describe(written).strip()}, not {describe(ours).strip()}; resume it "
             "with the file and flags that wrote it, or start afresh in another --out")
    if ckpt["step_in_epoch"] and (ckpt["world_size"], written["batch_size"]) != (world(), args.batch_size):
        fail(f"{args.resume} stopped mid-epoch with {ckpt['world_size']} ranks and --batch-size "
             f"{written['batch_size']}; resume with the same")
    return ckpt


def log_metrics(out, tensorboard=None, **record):
    """One JSON object per line in OUT/metrics.jsonl, from rank 0; with `tensorboard` (rank 0's SummaryWriter) also its
    numbers at its step: a progress record's under train/, an evaluation's under eval/."""
    if rank() == 0:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    if tensorboard is not None:
        group = "train" if "loss" in record else "eval"
        for k, v in record.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                tensorboard.add_scalar(f"{group}/{k}", v, record["step"])
        tensorboard.flush()  # on disk now (a few records a minute): a run killed later keeps what it logged


def plot_curves(out):
    """OUT/curves.png from the whole OUT/metrics.jsonl (a resumed run's too), when matplotlib is installed: the loss and
    lr against step, the kNN top-1 against epoch, the last evaluation's figures in the title."""
    try:  # a Figure without pyplot renders with Agg and leaves the caller's backend and figures alone
        from matplotlib.figure import Figure
    except ImportError:
        return
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train, knn, final = [r for r in records if "loss" in r], [r for r in records if "knn_top1" in r], records[-1]
    fig = Figure(figsize=(10, 3.8))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.5)  # tight_layout would double the cost
    loss_ax, knn_ax = fig.subplots(1, 2)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    loss_ax.set(xlabel="step", ylabel="loss")
    lr_ax = loss_ax.twinx()
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], "--", color="tab:orange")
    lr_ax.set_ylabel("lr (dashed)")
    knn_ax.plot([r["epoch"] for r in knn], [r["knn_top1"] for r in knn], "o-", color="tab:green")
    knn_ax.set(xlabel="epoch", ylabel="kNN top-1, %")
    figures = [f"{k} {final[k]:.2f}" for k in ("knn_top1", "linear_top1") if k in final]
    fig.suptitle(f"{os.path.basename(os.path.normpath(out))}: step {final.get('step', 0)}, " + ", ".join(figures))
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)


NEVER = 2 ** 62  # "no non-finite loss seen" for the divergence check


def stop_if_diverged(first_bad_step, last_good, model=None, step=None):
    """A non-finite loss (or a non-finite value in `model`, at `step`): one line naming it and the last good checkpoint."""
    if model is not None:
        finite = torch.stack([t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]).all()
        first_bad_step = torch.where(finite, first_bad_step, torch.clamp(first_bad_step, max=step))
    first_bad = all_reduce(first_bad_step, "min").item()
    if first_bad < NEVER:
        good = f"the last good checkpoint is {last_good[0]} (step {last_good[1]})" if last_good else "no checkpoint was written"
        fail(f"training diverged: non-finite loss or weights at step {first_bad}; {good}; lower --lr and --resume from it")


class Run:
    """The loop plumbing every method file shares, one call each: resume(), start(), after_step() (progress line,
    metrics.jsonl, checkpoints, the kNN monitor, the divergence and stop checks) and final_evaluation(). `state` names
    what a checkpoint holds (model=..., optimizer=...; method state lives in the model's buffers); `trunk` is what
    backbone.pth holds, and the probes read `features` (default: the trunk). backbone.pth also records what rebuilds
    the trunk (hubconf.py): the method, --arch and --image-size (build_backbone's arguments), and `trunk_recipe`, the
    arguments of a file's own trunk builder beyond those (CPC's norm and stacks)."""
    tensorboard = None  # --tensorboard: rank 0's SummaryWriter, from resume() to the end of final_evaluation()

    def __init__(self, args, device, probe_sets, trunk, features=None, trunk_recipe=None, **state):
        self.args, self.device, self.trunk, self.features, self.state = args, device, trunk, features or trunk, state
        self.recipe = {"method": args.method, "arch": args.arch, "image_size": args.image_size, **(trunk_recipe or {})}
        self.probe_loaders, self.monitor_loaders = probe_loaders(probe_sets, args)
        if args.finetune_epochs:  # what fine-tuning needs, checked before training
            labels = dataset_labels(probe_sets[0])
            if (labels < 0).all():
                fail(f"--finetune-epochs needs labelled training images; {args.dataset}'s probe training set has no "
                     "labels: drop --finetune-epochs or give a labelled set")
            if len(labels) < args.finetune_batch_size or args.finetune_batch_size % world():
                fail(f"--finetune-batch-size {args.finetune_batch_size} needs a multiple of the {world()} ranks and at "
                     f"most the {len(labels)} labelled training images; lower it")
        # --baselines: the trunk as the method initialised it (before --resume), probed beside the trained one
        self.initial_trunk = copy.deepcopy(trunk.state_dict()) if args.baselines else None
        self.path, self.last_good, self.resumed = os.path.join(args.out, "checkpoint.pth"), None, False
        self.epochs_done = self.global_step = 0
        self.first_bad_step = torch.tensor(NEVER, device=device)  # on the device: no host sync per step

    def resume(self):
        """Load --resume (with --eval-only also a backbone.pth) -> (epoch, step in epoch) to start at. With
        --tensorboard rank 0 opens its writer here: resumed, it hides what an ended run logged after the checkpoint
        (after a kill -9 those steps are trained and logged again)."""
        ckpt = read_checkpoint(self.args, self.trunk)
        if ckpt is not None:
            for name, obj in self.state.items():
                load_weights(obj, ckpt[name], self.args.resume) if name == "model" else obj.load_state_dict(ckpt[name])
            self.epochs_done, self.global_step, self.resumed = ckpt["epoch"], ckpt["global_step"], True
            self.last_good = (self.args.resume, ckpt["global_step"])
        if self.args.tensorboard and rank() == 0:
            from torch.utils.tensorboard import SummaryWriter  # parse() checked that it imports
            self.tensorboard = SummaryWriter(os.path.join(self.args.out, "tensorboard"),
                                             purge_step=self.global_step + 1 if self.resumed else None)
        return (ckpt["epoch"], ckpt["step_in_epoch"]) if ckpt else (0, 0)

    def start(self, steps_per_epoch, start_epoch, start_step, peak_lr):
        """Count steps from where --resume left off; the run ends at --epochs or --max-steps, whichever is first.
        Prints the run's effective configuration. From here to the last step SIGTERM, SIGINT and SIGUSR1 stop the run
        at a checkpoint (after_step)."""
        args, total_steps = self.args, self.args.epochs * steps_per_epoch
        self.steps_per_epoch, self.last_step = steps_per_epoch, min(total_steps, args.max_steps or total_steps)
        self.global_step = start_epoch * steps_per_epoch + start_step
        self.tick = self.check_tick = (time.time(), self.global_step)
        self.next_check, self.first_step, self.cpu_clock = self.global_step + 1, self.global_step, None
        _stop["step"] = self.global_step + 1
        stem = "CIFAR stem: 3x3 conv, no max-pool" if args.image_size <= 64 else "ImageNet stem"
        if args.arch in VIT:
            stem = f"{VIT[args.arch][0]} px patches, {(args.image_size // VIT[args.arch][0]) ** 2} tokens and the class token"
        ends = f", --max-steps {args.max_steps}" if self.last_step < total_steps else ""
        print0(f"{args.method}: --arch {args.arch} ({stem}) at {args.image_size} px, batch {args.batch_size} "
               f"({args.batch_size // world()} on each of {world()} {self.device.type} ranks), peak lr {peak_lr:.4g}, "
               f"{args.epochs} epochs of {steps_per_epoch} steps{ends}, {'bf16' if args.amp else 'fp32'}"
               + (", compiled" if args.compile else "") + (f"; from step {self.global_step}" if self.global_step else ""))
        catch_stop_signals(not self.done())

    def done(self):
        return self.global_step >= self.last_step

    def after_step(self, epoch, step, loss, lr):
        """Call after each optimizer step with this rank's loss (a tensor). Returns True at the last step."""
        args, self.global_step, loss = self.args, self.global_step + 1, loss.detach().float()
        _stop["step"] = self.global_step  # the step a stop signal is acknowledged in, until it is checked
        self.first_bad_step = torch.minimum(self.first_bad_step, torch.where(loss.isfinite(), NEVER, self.global_step))
        end_of_epoch = step + 1 == self.steps_per_epoch
        if self.global_step % args.print_freq == 0 or end_of_epoch or self.done():
            self.progress(epoch, step, loss, lr)
        saved = end_of_epoch or self.done() or (args.save_every and self.global_step % args.save_every == 0)
        if saved:
            self.save(epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else step + 1)
        if self.device.type == "cpu" and self.global_step - self.first_step <= 2:
            self.warn_if_slow()
        if self.global_step >= self.next_check or self.done():  # every rank checks at this same step
            now, (then, then_step) = time.time(), self.check_tick
            self.next_check = self.global_step + stop_if_requested(self.device, self.global_step, self.path, lambda:
                                                                   saved or self.save(epoch, step + 1),
                                                                   self.global_step - then_step, now - then)
            self.check_tick = (now, self.global_step)
            if self.done():
                catch_stop_signals(False)  # trained and checkpointed: a signal from here on just ends the process
        _stop["step"] = self.global_step + 1  # past the check: a signal from here on is the next step's
        if end_of_epoch and args.eval_every and (epoch + 1) % args.eval_every == 0 and not self.done():
            monitor = evaluate(self.features, *self.monitor_loaders, self.device, args, linear=False, trunk=self.trunk)
            best = monitor.get("best_stage_knn", "final")
            print0(f"epoch {epoch + 1} kNN top-1 {monitor['knn_top1']:.2f}" + (f", best stage {best} "
                   f"{monitor[best + '_knn_top1']:.2f}" if best != "final" else ""))
            log_metrics(args.out, self.tensorboard, epoch=epoch + 1, step=self.global_step, **monitor)
            self.tick = (time.time(), self.global_step)  # evaluation time is not training throughput
        return self.done()

    def warn_if_slow(self):
        """On CPU, timed by the second step (the first also starts the workers): one line if an epoch takes an hour."""
        now, args = time.time(), self.args
        if self.global_step - self.first_step == 2 and (now - self.cpu_clock) * self.steps_per_epoch > 3600:
            vit, tiny = args.arch in VIT, "vit-tiny" if args.arch in VIT else "resnet-tiny"
            stem = ", whose CIFAR stem keeps full resolution through layer1," if args.image_size <= 64 and not vit else ""
            print0(f"warning: one epoch of --arch {args.arch} at {args.image_size} px{stem} takes about "
                   f"{(now - self.cpu_clock) * self.steps_per_epoch / 3600:.1f} hours on this CPU; for a CPU run use "
                   + f"--arch {tiny}, " * (args.arch != tiny) + "a smaller --image-size or --subset, or a GPU")
        self.cpu_clock = now

    def progress(self, epoch, step, loss, lr):
        """The progress line and its metrics.jsonl record: the ranks' mean loss (the only host sync), img/s, ETA."""
        stop_if_diverged(self.first_bad_step, self.last_good)
        loss, batch = all_reduce(loss, "mean").item(), self.args.batch_size
        img_per_s = (self.global_step - self.tick[1]) * batch / max(time.time() - self.tick[0], 1e-9)
        memory = {"peak_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30} if self.device.type == "cuda" else {}
        print0(f"epoch {epoch} step {step + 1}/{self.steps_per_epoch} loss {loss:.4f} lr {lr:.4g} {img_per_s:.0f} "
               f"img/s eta {hms((self.last_step - self.global_step) * batch / max(img_per_s, 1e-9))}"
               + "".join(f" peak {v:.1f} GiB" for v in memory.values()))
        log_metrics(self.args.out, self.tensorboard, epoch=epoch, step=self.global_step, loss=loss, lr=lr,
                    img_per_s=img_per_s, **memory)
        self.tick = (time.time(), self.global_step)

    def save(self, epoch, step_in_epoch):
        """Atomic checkpoint.pth + backbone.pth from rank 0; never of non-finite values."""
        stop_if_diverged(self.first_bad_step, self.last_good, self.state["model"], self.global_step)
        if rank() == 0:
            save_atomic({**{name: obj.state_dict() for name, obj in self.state.items()}, "epoch": epoch,
                         "step_in_epoch": step_in_epoch, "global_step": self.global_step, "world_size": world(),
                         "args": vars(self.args)}, self.path)
            backbone = self.trunk.state_dict()  # torchvision's keys; the recipe in torch's own per-state-dict metadata,
            backbone._metadata[""]["sslref"] = self.recipe  # which load_state_dict ignores and torch.load keeps
            save_atomic(backbone, os.path.join(self.args.out, "backbone.pth"))
        self.last_good, self.epochs_done = (self.path, self.global_step), epoch
        self.tick = (time.time(), self.global_step)

    def final_evaluation(self, extra=None):
        """The probes, `extra()` (a method's own results), the baselines and the replicas' largest weight difference;
        logged, then the TensorBoard writer closed and curves.png drawn."""
        print0("final evaluation of the " + ("trained trunk" if not self.args.eval_only else "trunk of --resume"
                                             if self.args.resume else "random-init trunk (--eval-only)"))
        results = evaluate(self.features, *self.probe_loaders, self.device, self.args, trunk=self.trunk)
        if self.args.finetune_epochs:
            results.update(finetune(self.features, self.probe_loaders, self.device, self.args))
        results.update(extra() if extra else {})
        if self.initial_trunk is not None:
            results.update(baselines(self.features, self.trunk, self.initial_trunk, self.probe_loaders, self.device, self.args))
        if world() > 1:
            flat = torch.cat([p.detach().float().flatten() for p in self.state["model"].parameters()])
            reference = flat.clone()  # |w - w_rank0| over all ranks: 0.0 when DDP kept the replicas in step
            dist.broadcast(reference, 0)
            results["rank_weight_max_diff"] = all_reduce((flat - reference).abs().max(), "max").item()
        log_metrics(self.args.out, self.tensorboard, epoch=self.epochs_done, step=self.global_step, **results)
        print0(" ".join(f"{k} {v if isinstance(v, str) else f'{v:.4g}'}" for k, v in results.items()))
        if self.tensorboard is not None:
            self.tensorboard.close()
        if rank() == 0:
            plot_curves(self.args.out)
        return results


# ==== 7. Evaluation: frozen features, kNN, linear probe, fine-tuning. Reads args.probe_stages, probe_blocks, ==========
# probe_epochs, knn_k, knn_t, seed, amp, image_size, print_freq; fine-tuning also finetune_epochs, finetune_batch_size,
# finetune_lr, finetune_warmup_epochs, finetune_mixup, finetune_cutmix, layer_decay, dataset, workers
# Each rank keeps only the features of its own share of the probe sets (eval_loader), sharded through kNN and probe.
KNN_MEMORY_BYTES = 2 ** 30  # the kNN's similarity block per rank, whatever the dataset size
PROBE_MEMORY_BYTES = 4 * 2 ** 30  # per rank: the probe features held at once; stages beyond it take another pass
FEATURE_DTYPE = {"cuda": torch.bfloat16}  # the cached features' dtype by device type (others: fp32)
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "final")


class Progress:
    """From rank 0, every `every` of `total` items (every=0: never), at most one line each `seconds`: what, how far,
    the ETA; at the last item the time it took. On CUDA the printing rank first waits for the device, so the times
    are the GPU's (one sync a line)."""
    seconds = 5.0

    def __init__(self, what, total, every, device):
        self.what, self.total, self.every, self.device = what, total, every, device
        self.start = self.said = time.time()

    def __call__(self, done):
        last = done == self.total
        if self.every and rank() == 0 and (last or done % self.every == 0 and time.time() - self.said >= self.seconds):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.said, elapsed = time.time(), time.time() - self.start
            print(f"  {self.what} {done}/{self.total} " + (f"in {hms(elapsed)}" if last else
                                                           f"eta {hms(elapsed / done * (self.total - done))}"), flush=True)


def evaluate(features, probe_train_loader, probe_test_loader, device, args, linear=True, trunk=None):
    """kNN (and optionally linear-probe) accuracy of frozen features; same result on every rank. Given the `trunk` and
    --probe-stages, also of its stem and stages (StageFeatures; as many per pass over the probe sets as
    PROBE_MEMORY_BYTES holds): knn_top1 etc. stay the final features', {stage}_knn_top1 etc. are each stage's, and
    best_stage_knn (best_stage_linear) names the best."""
    if args.probe_blocks > 1 and isinstance(trunk, ViT):
        features = LastBlocks(trunk, args.probe_blocks)
    if is_distributed():  # BN running stats drift apart without SyncBN (CPU): use rank 0's, as DDP does
        for buffer in features.buffers():
            dist.broadcast(buffer, 0)
    stem = [] if isinstance(trunk, ViT) else ["stem"]
    stages = [*stem, *trunk_stages(trunk), "final"] if args.probe_stages and trunk is not None else ["final"]
    linear, results = linear and args.probe_epochs > 0, {}
    progress = lambda what: lambda total: Progress(what, total, args.print_freq, device)  # lines as often as training's
    rows = len(probe_train_loader.sampler) + len(probe_test_loader.sampler)
    stage_bytes = rows * StageFeatures(features, trunk).budget * (2 if device.type == "cuda" else 4)
    per_pass = max(1, int(PROBE_MEMORY_BYTES // max(1, stage_bytes)))
    for first in range(0, len(stages), per_pass):
        probe = StageFeatures(features, trunk if len(stages) > 1 else None, stages[first:first + per_pass])
        (train_f, train_y, _), (test_f, test_y, _) = (
            extract_features(probe, loader, device, args.amp, progress(f"{split} features, batch"))
            for split, loader in (("probe train", probe_train_loader), ("probe test", probe_test_loader)))
        probe.remove_hooks()
        for s in probe.stages:
            name, of = ("", "") if s == "final" else (f"{s}_", f" ({s})")
            results[f"{name}knn_top1"] = knn_classify(train_f[s], train_y, test_f[s], test_y, args.knn_k, args.knn_t,
                                                      progress=progress(f"kNN{of}, query block"))
            if linear:
                results[f"{name}linear_top1"], results[f"{name}linear_top5"] = linear_probe(
                    train_f[s], train_y, test_f[s], test_y, args.probe_epochs, seed=args.seed,
                    progress=progress(f"linear probe{of}, step"), lars=args.probe_lars)
        del train_f, test_f
    for kind in ("knn", "linear")[:1 + linear] if len(stages) > 1 else ():
        score = {s: results[f"{'' if s == 'final' else s + '_'}{kind}_top1"] for s in stages}
        results[f"best_stage_{kind}"] = max(score, key=score.get)
    return results


def baselines(features, trunk, initial_trunk, loaders, device, args):
    """--baselines: the probes of the trunk at its initial weights and (<= 64 px) of the raw normalised pixels."""
    print0("baseline 1 of 2: the trunk at its initialisation" if args.image_size <= 64 else
           "baseline: the trunk at its initialisation")
    trained = copy.deepcopy(trunk.state_dict())
    trunk.load_state_dict(initial_trunk)
    results = {f"random_init_{k}": v for k, v in evaluate(features, *loaders, device, args, trunk=trunk).items()}
    if args.finetune_epochs:
        results["random_init_finetune_top1"] = finetune(features, loaders, device, args)["finetune_top1"]
    trunk.load_state_dict(trained)
    if args.image_size <= 64:
        print0("baseline 2 of 2: the raw normalised pixels")
        results.update({f"raw_pixels_{k}": v for k, v in evaluate(nn.Flatten(), *loaders, device, args).items()})
    return results


@torch.no_grad()
def extract_features(trunk, loader, device, amp=False, progress=None):
    """Frozen trunk in eval mode over this rank's share (eval_loader) -> (features, labels, dataset indices); features a
    dict when the trunk returns one (StageFeatures). Features are bf16 on CUDA, half of fp32's memory with its range
    (fp16 tops out at 65,504, which a trunk without normalisation can pass: CPC v1's), and fp32 on CPU, written into
    preallocated tensors. progress(total batches) gives a function of the batches done that prints lines (Progress)."""
    was_training, feats, filled, n = trunk.training, None, 0, len(loader.sampler)
    trunk.eval()
    labels, indices = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    tick = progress(len(loader)) if progress else None
    for batch, (x, y, i) in enumerate(loader, 1):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            f = trunk(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x)
        f = f if isinstance(f, dict) else {None: f}
        if feats is None:
            dtype = FEATURE_DTYPE.get(device.type, torch.float32)
            feats = {k: torch.empty(n, v.shape[1], dtype=dtype, device=device) for k, v in f.items()}
        for k, v in f.items():
            feats[k][filled:filled + len(v)] = v
        labels[filled:filled + len(y)], indices[filled:filled + len(y)] = y, i
        filled += len(y)
        if tick:
            tick(batch)
    trunk.train(was_training)
    return feats.get(None, feats), labels.to(device), indices.to(device)


def trunk_stages(trunk):
    """The residual stages a trunk holds layers in (CPC's v1 trunk stops after layer3: its layer4 is an Identity); a
    ViT's blocks at a quarter, half and three quarters of its depth (the last block's is the final feature)."""
    if isinstance(trunk, ViT):
        depth = len(trunk.encoder.layers)
        return [f"block{depth * q // 4}" for q in (1, 2, 3) if depth * q // 4 > 0]
    return [s for s in STAGES[1:-1] if next(getattr(trunk, s).parameters(), None) is not None]


class StageFeatures(nn.Module):
    """features(x) as "final" and, given a trunk, its stem (after the ReLU) and residual stages, read by forward hooks,
    each map average-pooled to a g x g grid with C g^2 close to `budget` = 4.5 x the trunk's width: Goyal et al. 2019
    (Sec. 3) and VISSL's ResNet-50 linear benchmarks pool conv1 to 12x12, res2 6x6, res3 4x4, res4 3x3 and res5 2x2,
    about 9k = 4.5 x 2048 dims; every ResNet's stage widths scale together, so each trunk gets those grids (resnet18:
    about 2.3k dims, resnet-tiny 576). A trunk run on P patches per image (CPC) gives each image the mean of its
    patches' pooled maps, as its final feature. -> {stage: (B, dim)} for the stages asked for."""

    def __init__(self, features, trunk=None, stages=("final",)):
        super().__init__()
        self.features, self.stages, self.maps = features, stages, {}
        self.train(features.training)  # as a module it has a mode: the features' own
        self.norm = trunk.encoder.ln if isinstance(trunk, ViT) else None
        if self.norm is not None:  # a block's class token after the final LayerNorm (DINO's get_intermediate_layers)
            self.budget = trunk.hidden_dim
            hooked = {s: trunk.encoder.layers[int(s[5:]) - 1] for s in stages if s != "final"}
        else:
            last = trunk_stages(trunk)[-1] if trunk is not None else None
            convs = [m for m in getattr(trunk, last).modules() if isinstance(m, nn.Conv2d)] if last else []
            self.budget = 4.5 * convs[-1].out_channels if convs else 0  # 4.5 x the width of the trunk's last stage
            hooked = {s: getattr(trunk, "relu" if s == "stem" else s) for s in stages if s != "final"}
        self.hooks = [m.register_forward_hook(functools.partial(self.keep, s)) for s, m in hooked.items()]

    def keep(self, stage, module, inputs, output):
        if self.norm is not None:
            self.maps[stage] = self.norm(output[:, 0])
            return
        C, H, W = output.shape[1:]
        self.maps[stage] = F.adaptive_avg_pool2d(output, max(1, min(H, W, round(math.sqrt(self.budget / C))))).flatten(1)

    def forward(self, x):
        self.maps["final"] = self.features(x)
        return {s: self.maps.pop(s).unflatten(0, (len(x), -1)).mean(1) for s in self.stages}

    def remove_hooks(self):
        for hook in self.hooks:
            hook.remove()


class LastBlocks(nn.Module):
    """--probe-blocks n: a ViT's class tokens of its last n blocks, each after the final LayerNorm, concatenated
    (DINO's eval_linear.py, get_intermediate_layers): n x its width."""

    def __init__(self, trunk, n):
        super().__init__()
        self.trunk, self.n = trunk, n

    def forward(self, x):
        kept = []
        hooks = [block.register_forward_hook(lambda m, i, out: kept.append(out[:, 0]))
                 for block in self.trunk.encoder.layers[-self.n:]]
        try:
            self.trunk(x)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([self.trunk.encoder.ln(t) for t in kept], 1)


def _pad_rows(x, rows, value=0):
    return torch.cat([x, x.new_full((rows - len(x), *x.shape[1:]), value)]) if len(x) < rows else x


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=200, t=0.1, memory_bytes=None, progress=None):
    """Weighted kNN of Wu et al. 2018 (InstDisc): the k most cosine-similar train rows vote with exp(sim / t). Sharded,
    each rank passing its share of both sets, in two stages: every rank scores all ranks' queries against its own train
    rows and keeps its top-k, and the top-k of those gathered is the global top-k. -> top-1 in percent, on every rank.
    Where similarities tie at the k-th place, which neighbour is kept can differ with the number of ranks."""
    device, counts = test_f.device, torch.tensor([len(test_f), len(train_f)], device=test_f.device)
    (n_test, n_train), (max_test, max_train) = all_reduce(counts).tolist(), all_reduce(counts, "max").tolist()
    num_classes = int(all_reduce(torch.cat([train_y, test_y, train_y.new_zeros(1)]).max(), "max")) + 1
    kk = min(k, max_train)  # per rank, padded with -inf where a rank has fewer train rows
    # cosine similarity without a normalised copy of the train features: divide the dot products by their norms
    train_norm = torch.cat([train_f[s:s + 65536].float().norm(dim=1) for s in range(0, len(train_f), 65536)]
                           + [train_f.new_zeros(0, dtype=torch.float)]).clamp_min(1e-12)
    train_y = _pad_rows(train_y, max(len(train_y), kk))
    test_f = _pad_rows(F.normalize(test_f.float(), dim=1).to(train_f.dtype), max_test)
    test_y = _pad_rows(test_y, max_test, -1)  # -1: a padding query, not counted
    chunk = max(1, (memory_bytes or KNN_MEMORY_BYTES) // (8 * world() * max(1, max_train)))  # fp32 scores + top-k
    correct, tick = torch.zeros((), device=device), progress(-(-max_test // chunk)) if progress else None
    for s in range(0, max_test, chunk):
        queries, labels = gather(test_f[s:s + chunk]), gather(test_y[s:s + chunk])  # every rank's chunk
        sim = ((queries @ train_f.T).float() / train_norm).nan_to_num_(nan=-math.inf)  # (queries, my train rows)
        sim = _pad_rows(sim.T, kk, -math.inf).T
        top_sim, top = sim.topk(kk, dim=1)
        top_sim, top_y = (gather(v[None]).permute(1, 0, 2).flatten(1) for v in (top_sim, train_y[top]))  # (q, w kk)
        top_sim, top = top_sim.topk(min(k, n_train), dim=1)
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, top_y.gather(1, top), (top_sim / t).exp())
        correct += ((votes.argmax(1) == labels) & (labels >= 0)).sum()
        if tick:
            tick(s // chunk + 1)
    return 100.0 * correct.item() / n_test


def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=0.1, batch_size=256, seed=0, progress=None,
                 lars=False):
    """Linear classifier on cached frozen features -> (top-1, top-5) in percent. Standardised inputs (as MAE's
    parameter-free BN), weights N(0, 0.01), bias 0, SGD momentum 0.9, cosine lr, no weight decay. Sharded as DDP: each
    rank steps through its own rows, batch_size / world at a time, and the gradients are averaged across ranks.
    lars: SimSiam's main_lincls instead: LARS (apex's LARC, trust 0.001, every parameter) at batch 4096, lr 0.1 x 16."""
    if lars:
        lr, batch_size = 0.1 * 4096 / 256, 4096
    device, w = train_f.device, world()
    g = torch.Generator(device="cpu").manual_seed(seed)
    num_classes = int(all_reduce(torch.cat([train_y, test_y, train_y.new_zeros(1)]).max(), "max")) + 1
    count = all_reduce(torch.tensor(float(len(train_f)), device=device))  # mean and (unbiased) std of all ranks' rows
    mean = all_reduce(sum((train_f[s:s + 8192].float().sum(0) for s in range(0, len(train_f), 8192)),
                          torch.zeros(train_f.shape[1], device=device))) / count
    std = (all_reduce(sum((((train_f[s:s + 8192].float() - mean) ** 2).sum(0) for s in range(0, len(train_f), 8192)),
                          torch.zeros(train_f.shape[1], device=device))) / (count - 1)).sqrt() + 1e-6
    head = nn.Linear(train_f.shape[1], num_classes).to(device)
    with torch.no_grad():  # the same initial head on every rank
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    if rank():  # each rank its own order of its rows (rank 0 keeps the one-process order)
        g.manual_seed(seed + 1000003 * rank())
    local_batch = -(-batch_size // w)
    steps = max(1, -(-int(all_reduce(torch.tensor(len(train_f), device=device), "max")) // local_batch))
    opt = LARS(head.parameters(), lr, weight_decay=0.0) if lars else torch.optim.SGD(head.parameters(), lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps))
    tick = progress(epochs * steps) if progress else None
    for epoch in range(epochs):
        perm = torch.randperm(len(train_f), generator=g).to(device)
        for s in range(steps):
            b = perm[s * local_batch:(s + 1) * local_batch]  # short or empty on a rank whose rows ran out
            loss = F.cross_entropy(head((train_f[b].float() - mean) / std), train_y[b], reduction="sum")
            opt.zero_grad(set_to_none=False)
            (loss / max(1, len(b))).backward()
            if w > 1:  # one all-reduce per step, as DDP
                grads = all_reduce(torch.cat([p.grad.flatten() for p in head.parameters()]), "mean")
                for p, grad in zip(head.parameters(), grads.split([p.numel() for p in head.parameters()])):
                    p.grad.copy_(grad.view_as(p))
            opt.step()
            sched.step()
            if tick:
                tick(epoch * steps + s + 1)
    correct = torch.zeros(2, device=device)
    with torch.no_grad():
        for s in range(0, len(test_f), 65536):
            top5 = head((test_f[s:s + 65536].float() - mean) / std).topk(min(5, num_classes), dim=1).indices
            y = test_y[s:s + 65536, None]
            correct += torch.stack([(top5[:, :1] == y).sum(), (top5 == y).sum()])
    correct = all_reduce(correct) / all_reduce(torch.tensor(float(len(test_f)), device=device))
    return (correct[0].item() * 100, correct[1].item() * 100)


# Fine-tuning (--finetune-epochs): MAE's main_finetune recipe (FINETUNE.md's ViT-B command) with torchvision's parts
FINETUNE = dict(weight_decay=0.05, min_lr=1e-6, drop_path=0.1, smoothing=0.1, reprob=0.25)


def finetune_transform(dataset, image_size):
    """timm's create_transform as MAE's util/datasets.py calls it, with torchvision's ops: a bicubic random resized
    crop (0.08-1), flip, RandAugment (2 ops at magnitude 9; timm's rand-m9-mstd0.5-inc1 draws the magnitude around 9
    and has other ops: a deviation), and random erasing of a quarter of the images with per-pixel noise."""
    return T.Compose([T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.RandAugment(num_ops=2, magnitude=9), T.ToTensor(), normalize(dataset),
                      T.RandomErasing(p=FINETUNE["reprob"], value="random")])


def layer_decay_groups(model, vit, layer_decay, weight_decay):
    """MAE's util/lr_decay.py param_groups_lrd: with L = blocks + 1, the class token, position embedding and patch
    projection are layer 0, block i is layer i + 1, the rest (the final norm, the head) layer L; each group's lr is
    scaled by layer_decay ** (L - layer). No weight decay for 1-d parameters, the class token and the position
    embedding. Without a ViT every parameter is in layer L (scale 1)."""
    depth, names = (len(vit.encoder.layers), {id(p): n for n, p in vit.named_parameters()}) if vit else (0, {})
    groups = {}
    for p in model.parameters():
        name, layer = names.get(id(p), ""), depth + 1
        if name in ("class_token", "encoder.pos_embedding") or name.startswith("conv_proj"):
            layer = 0
        elif name.startswith("encoder.layers."):
            layer = int(name.split(".")[2].rsplit("_", 1)[1]) + 1
        no_decay = p.ndim == 1 or name in ("class_token", "encoder.pos_embedding")
        group = groups.setdefault((layer, no_decay), {"params": [], "lr_scale": layer_decay ** (depth + 1 - layer),
                                                      "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def finetune(features, loaders, device, args):
    """--finetune-epochs: a copy of the features' module (the trunk) and a new linear head trained end to end on the
    labelled training images, then its top-1 on the test images (features and trunk left as they are). MAE's
    main_finetune: AdamW at --finetune-lr x batch / 256, layer-wise lr decay for a ViT, weight decay 0.05, warm-up
    then a cosine to 1e-6 per step, drop path 0.1 rising over the blocks, MixUp 0.8 / CutMix 1.0 (one of the two per
    batch; --finetune-mixup, --finetune-cutmix) with label smoothing 0.1, the head N(0, 2e-5). Deviations: the head
    reads the class token after the final norm (DeiT, MoCo v3; MAE's default pools the patch tokens into a new norm),
    and the test images get the probes' bilinear resize (MAE's: bicubic). Randomness: the per-sample seed, and (seed,
    rank, step) for the mixing and drop path."""
    from torchvision.transforms import v2
    probe_train, test_loader = loaders[0].dataset, loaders[1]
    classes = int(all_reduce(dataset_labels(probe_train).max().to(device), "max")) + 1
    dataset = Transformed(probe_train.base, finetune_transform(args.dataset, args.image_size), args.seed)
    sampler = EpochSampler(dataset, args.finetune_batch_size // world(), num_replicas=world(), rank=rank(),
                           shuffle=True, seed=args.seed, drop_last=True)
    loader = Loader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
                    pin_memory=torch.cuda.is_available())
    trunk = copy.deepcopy(features).requires_grad_(True)  # frozen parts in pretraining (a teacher, MoCo v3's patches) train
    with torch.no_grad():
        width = trunk.eval()(torch.zeros(2, 3, args.image_size, args.image_size, device=device)).shape[1]
    head = nn.Linear(width, classes).to(device)
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(trunk, head).train()
    vit = next((m for m in model.modules() if isinstance(m, ViT)), None)
    if vit is not None:
        for block, rate in zip(vit.encoder.layers, torch.linspace(0, FINETUNE["drop_path"], len(vit.encoder.layers))):
            block.rate = float(rate)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if world() > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = layer_decay_groups(model, vit, args.layer_decay, FINETUNE["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=0.0)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world() > 1 else model
    mixes = [kind(alpha=alpha, num_classes=classes) for kind, alpha in ((v2.MixUp, args.finetune_mixup),
                                                                         (v2.CutMix, args.finetune_cutmix)) if alpha]
    mix = v2.RandomChoice(mixes) if mixes else lambda x, y: (x, y)  # timm's Mixup: switch prob 0.5
    steps_per_epoch = len(sampler) // sampler.batch_size
    total, warmup = args.finetune_epochs * steps_per_epoch, round(args.finetune_warmup_epochs * steps_per_epoch)
    peak, step = args.finetune_lr * args.finetune_batch_size / 256, 0
    tick = Progress("fine-tuning, step", total, args.print_freq, device)
    for epoch in range(args.finetune_epochs):
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            lr = cosine_lr(step, total, warmup, peak, FINETUNE["min_lr"])  # lr_sched.adjust_learning_rate per step
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.random.fork_rng(devices=[]):  # v2's MixUp / CutMix draw from torch's CPU generator
                torch.default_generator.manual_seed(hash((args.seed, rank(), step)) & 0x7FFF_FFFF_FFFF_FFFF)
                x, target = mix(x, y)
            if vit is not None:
                vit.draw_from(step_generator((args.seed, rank()), step, device))
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = ddp(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=FINETUNE["smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tick(step)
    if vit is not None:
        vit.draw_from(None)
    model.eval()
    correct, seen = torch.zeros((), device=device), 0  # the count on the host: no copy per batch
    with torch.no_grad():
        for x, y, _ in test_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = model(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    correct = all_reduce(torch.stack([correct.float(), torch.tensor(float(seen), device=device)]))
    return {"finetune_top1": 100.0 * correct[0].item() / max(1.0, correct[1].item())}


# ==== 8. Appendix: the device stage's colour ops (section 3's ColorJitter, RandomGrayscale, GaussianBlur, Solarize) =
def _where(x, applied, fn, *per_sample):
    """fn(x, *per_sample) for the samples where `applied` (B,), x for the others. On CUDA all samples are computed and
    torch.where picks (no host sync); on CPU only the applied ones (nothing to sync with, as PIL), written into x."""
    if x.device.type != "cpu":
        return torch.where(applied[:, None, None, None], fn(x, *per_sample), x)
    index = applied.nonzero()[:, 0]
    if len(index) == len(x):
        return fn(x, *per_sample)
    if len(index):
        x.index_copy_(0, index, fn(x.index_select(0, index), *(v.index_select(0, index) for v in per_sample)))
    return x


def _grey(x):  # (B, 3, H, W) -> (B, 1, H, W), the ITU-R 601 luma of torchvision's rgb_to_grayscale
    return (x[:, 0:1] * 0.2989).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)


def _blend_slot(x, op, factors):
    """factor * x + (1 - factor) * reference, clamped to [0, 1] (torchvision's _blend), per sample: op 0 brightness
    blends with black, 1 contrast with the image's mean grey level, 2 saturation with its grey image."""
    factor = factors.gather(1, op.clamp(min=0)[:, None])[:, 0, None, None, None]  # (B, 1, 1, 1)
    grey = _grey(x)
    contrast, saturation = (op[:, None, None, None] == 1) * (1 - factor), (op[:, None, None, None] == 2) * (1 - factor)
    reference = torch.addcmul(grey.mean((1, 2, 3), keepdim=True) * contrast, grey, saturation)
    return torch.addcmul(reference, x, factor).clamp_(0, 1)


def _adjust_hue(x, h):
    """Rotate each sample's hue by h (B,) of a turn in HSV, as torchvision's tensor adjust_hue (PIL's rounds the hue
    to 8 bits, so it differs by about 1/255 of a channel); saturation and value stay."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)  # value and chroma (= v s)
    # hue in sixths of a turn, from the sector of the largest channel; shifted by 6 h, plus 6 to stay positive
    hue6 = torch.where(v == r, g - b, torch.where(v == g, (b - r).add_(c, alpha=2), (r - g).add_(c, alpha=4)))
    hue6.div_(c.clamp_min(1e-12)).add_(6 * h[:, None, None] + 6)
    # back to RGB: channel n (R 5, G 3, B 1) is v - c clamp(2 - |k - 2|, 0, 1), k = (n + hue6) mod 6; in place
    k = hue6[:, None] + torch.arange(5.0, 0.0, -2.0, device=x.device)[None, :, None, None]  # (no host copy)
    k.remainder_(6).sub_(2).abs_().neg_().add_(2).clamp_(0, 1)
    return k.mul_(c[:, None]).neg_().add_(v[:, None])
