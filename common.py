"""Shared plumbing for the sslref method files: data, distributed start-up, gathers,
backbones, checkpoints, metrics and probing (kNN + linear probe). Nothing method-specific."""
import argparse
import copy
import gzip
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T


def fail(msg):
    """Stop with a one-line error that says what to do (no traceback)."""
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


# ---- Data ------------------------------------------------------------------------------
DEFAULT_IMAGE_SIZE = {"imagefolder": 224, "stl10": 96, "cifar10": 32, "cifar100": 32, "fashion-mnist": 28}
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


def normalize(dataset):
    return T.Normalize(*MEAN_STD[dataset])


def eval_transform(dataset, image_size):
    """Deterministic transform for probing: resize + center crop (256/224 ratio for large images)."""
    resize = int(round(image_size * 256 / 224)) if image_size >= 128 else image_size
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize(dataset)])


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images (N, H, W[, 3]) + labels -> (PIL RGB image, label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, [int(y) for y in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return T.functional.to_pil_image(self.images[i]).convert("RGB"), self.labels[i]


def read_idx_gz(path):
    """Read an idx file (the MNIST / Fashion-MNIST format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root, split):
    """Zalando's idx .gz files from --data, torchvision's raw folder or Debian's package; else download."""
    images_name, labels_name = FASHION_FILES[split]
    for folder in [root, os.path.join(root, "FashionMNIST", "raw"), DEBIAN_FASHION_MNIST]:
        if os.path.isfile(os.path.join(folder, images_name)) and os.path.isfile(os.path.join(folder, labels_name)):
            images, labels = (read_idx_gz(os.path.join(folder, name)) for name in (images_name, labels_name))
            return ArrayDataset(images, labels)
    all_files = ", ".join(name for pair in FASHION_FILES.values() for name in pair)
    ds = download(torchvision.datasets.FashionMNIST, root, all_files, train=split == "train")
    return ArrayDataset(ds.data.numpy(), ds.targets.tolist())


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
        return torchvision.datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"{path} holds no images in class folders ({e})")


def base_datasets(name, root):
    """(pretrain, probe_train, probe_test) datasets yielding (PIL image, label), untransformed."""
    D = torchvision.datasets
    if name == "imagefolder":
        train, test = image_folder(root, "train"), image_folder(root, "val")
        return train, train, test
    if name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        files = f"{cls.filename} (from {cls.url})"
        train = download(cls, root, files, train=True)
        return train, train, download(cls, root, files, train=False)
    if name == "stl10":
        files = f"{D.STL10.filename} (from {D.STL10.url})"
        # STL-10 pretrains on train+unlabeled (105k images), probes on the 5k labelled train
        return (download(D.STL10, root, files, split="train+unlabeled"), download(D.STL10, root, files, split="train"),
                download(D.STL10, root, files, split="test"))
    if name == "fashion-mnist":
        train = fashion_mnist(root, "train")
        return train, train, fashion_mnist(root, "test")
    fail(f"unknown --dataset {name}")


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
        # torchvision's random transforms draw from torch's CPU generator: seed it for this sample, then
        # give it back as it was, so that with --workers 0 the training step's randomness stays its own
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(image), label, index


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler that yields (index, epoch) keys and can start mid-epoch (for --resume)."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_step = batch_size, 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start_step * self.batch_size:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return super().__len__() - self.start_step * self.batch_size


def build_datasets(args, train_transform):
    """Pretraining set (augmented, keyed by epoch) and the two probe sets (deterministic)."""
    if args.dataset == "imagefolder" and not os.path.isdir(args.data):
        fail(f"--data '{args.data}' does not exist; point it at a folder with train/ and val/ (the ImageNet layout)")
    if is_distributed() and dist.get_rank() > 0:
        dist.barrier()  # rank 0 downloads and extracts alone, then the others read its files
    root = args.data or "./data"
    pretrain, probe_train, probe_test = base_datasets(args.dataset, root)
    if is_distributed() and dist.get_rank() == 0:
        dist.barrier()
    if args.subset:  # evenly spaced, so a class-ordered folder keeps every class
        pretrain, probe_train = (torch.utils.data.Subset(ds, range(0, len(ds), max(1, len(ds) // args.subset))[:args.subset])
                                 for ds in (pretrain, probe_train))
    for split, ds in (("training", pretrain), ("probe test", probe_test)):
        if len(ds) == 0:
            fail(f"the {split} split of {args.dataset} at {root} is empty")
    test_tf = eval_transform(args.dataset, args.image_size)
    return (Transformed(pretrain, train_transform, args.seed), Transformed(probe_train, test_tf),
            Transformed(probe_test, test_tf))


def dataset_labels(ds):
    """Labels of a dataset from build_datasets, in index order, without loading an image (-1: unlabelled)."""
    if isinstance(ds, Transformed):
        return dataset_labels(ds.base)
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_labels(ds.dataset)[torch.tensor(list(ds.indices))]
    return torch.as_tensor(np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels), dtype=torch.long)


def train_loader(dataset, args, world_size, rank):
    sampler = EpochSampler(dataset, args.batch_size // world_size, num_replicas=world_size, rank=rank, shuffle=True,
                           seed=args.seed, drop_last=True)
    if len(sampler) < sampler.batch_size:
        fail(f"{len(dataset)} training images give no full batch of {args.batch_size}; lower --batch-size or raise --subset")
    loader = torch.utils.data.DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=args.workers > 0)
    return loader, sampler


def eval_loader(dataset, args, world_size, rank):
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world_size, rank, shuffle=False)
    return torch.utils.data.DataLoader(dataset, batch_size=max(1, args.batch_size // world_size), sampler=sampler,
                                       num_workers=args.workers, pin_memory=torch.cuda.is_available())


# ---- Distributed start-up and gathers --------------------------------------------------
def init_distributed():
    """(rank, world_size, device) from torchrun's environment; plain `python x.py` is world size 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            fail(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss used every slice: sum their gradients before taking ours (lightly#1528)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """All-gather along dim 0; backward sends each rank the sum of all ranks' gradients for its slice."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def gather(x):
    """All-gather along dim 0, no gradient."""
    if not is_distributed():
        return x
    x = x.contiguous()  # all_gather wants dense tensors of one layout (channels_last images become NCHW)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


@torch.no_grad()
def max_param_diff_across_ranks(model):
    """Largest |w - w_rank0| over all parameters and ranks: 0.0 when DDP kept the replicas in step."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def all_reduce_mean(x):
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# ---- Backbone --------------------------------------------------------------------------
def resnet_tiny(zero_init_residual=False, norm_layer=nn.BatchNorm2d):
    """BasicBlock ResNet, one block per stage, widths 16-32-64-128: for CPU smoke runs."""
    from torchvision.models.resnet import BasicBlock
    net = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
    net.inplanes = 16
    net.conv1, net.bn1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False), norm_layer(16)
    net.layer1, net.layer2, net.layer3, net.layer4 = (  # built in order: each reads net.inplanes
        net._make_layer(BasicBlock, width, 1, stride=1 if width == 16 else 2) for width in (16, 32, 64, 128))
    net.fc = nn.Linear(128, 1000)
    for m in net.modules():  # torchvision's own initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual and isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return net


def build_backbone(arch, image_size, zero_init_residual=False, norm_layer=nn.BatchNorm2d):
    """torchvision ResNet (its Kaiming fan-out init) without fc -> (trunk, width). At <= 64 px the CIFAR stem
    (3x3 conv, stride 1, no max-pool) as SimCLR's CIFAR setup; zero_init_residual zeroes each block's last BN."""
    if arch == "resnet-tiny":
        net = resnet_tiny(zero_init_residual, norm_layer)
    elif arch.startswith(("resnet", "wide_resnet", "resnext")) and hasattr(torchvision.models, arch):
        net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    else:
        fail(f"unknown --arch {arch}: use a torchvision ResNet (resnet18, resnet50, ...) or resnet-tiny")
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


# ---- Checkpoints, seeding and metrics --------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(obj, path):
    """torch.save to a temp file then rename: a crash mid-write never leaves a broken file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"--resume {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); it is truncated or corrupt: "
             "resume from another checkpoint or start afresh without --resume")


def load_weights(module, state_dict, path):
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        first_problem = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        fail(f"{path} does not fit this model ({first_problem}); "
             "pass the --arch, --image-size and model flags it was trained with")


def step_generator(seed, global_step, device):
    """The training step's own random generator, seeded from (seed, step): a resumed run draws the same
    numbers whatever --workers is, and nothing else (data loading included) draws from it."""
    return torch.Generator(device).manual_seed(hash((seed, global_step)) & 0x7FFF_FFFF_FFFF_FFFF)


NEVER = 2 ** 62  # "no non-finite loss seen" for the divergence check


class Run:
    """The loop plumbing every method file shares, one call each: resume(), after_step() (progress lines,
    metrics.jsonl, checkpoints, the kNN monitor, the divergence stop) and final_evaluation(). Method state
    (queue, memory bank) lives in `model`'s buffers, so checkpoints hold it."""

    def __init__(self, args, model, optimizer, backbone, probe_loaders, device, rank, world_size):
        self.args, self.model, self.optimizer, self.backbone = args, model, optimizer, backbone
        self.probe_loaders, self.device, self.rank, self.world_size = probe_loaders, device, rank, world_size
        self.path = os.path.join(args.out, "checkpoint.pth")
        self.last_good = None  # (path, global step) of the newest checkpoint known to hold finite values
        self.epochs_done = self.global_step = 0
        self.first_bad_step = torch.tensor(NEVER, device=device)  # on the device: no host sync per step
        # --baselines: the trunk as the method initialised it (before --resume), probed beside the trained one
        self.initial_backbone = copy.deepcopy(backbone.state_dict()) if getattr(args, "baselines", False) else None

    def resume(self):
        """Load --resume (with --eval-only also a backbone.pth) -> (epoch, step in epoch) to start at."""
        args = self.args
        if not args.resume:
            return 0, 0
        ckpt = load_checkpoint(args.resume)
        if "model" not in ckpt:
            if not args.eval_only:
                fail(f"{args.resume} is not a training checkpoint; pass OUT/checkpoint.pth "
                     "(backbone.pth needs --eval-only)")
            load_weights(self.backbone, ckpt, args.resume)
            return 0, 0
        load_weights(self.model, ckpt["model"], args.resume)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["step_in_epoch"] and (ckpt["world_size"], ckpt["args"]["batch_size"]) != (self.world_size, args.batch_size):
            fail(f"{args.resume} stopped mid-epoch with {ckpt['world_size']} ranks and --batch-size "
                 f"{ckpt['args']['batch_size']}; resume with the same")
        self.epochs_done, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.last_good = (args.resume, ckpt["global_step"])
        return ckpt["epoch"], ckpt["step_in_epoch"]

    def start(self, steps_per_epoch, start_epoch, start_step):
        """Count steps from where --resume left off; the run ends at --epochs or --max-steps, whichever is first."""
        total_steps = self.args.epochs * steps_per_epoch
        self.steps_per_epoch, self.last_step = steps_per_epoch, min(total_steps, self.args.max_steps or total_steps)
        self.global_step = start_epoch * steps_per_epoch + start_step
        self.tick = (time.time(), self.global_step)

    def done(self):
        return self.global_step >= self.last_step

    def after_step(self, epoch, step, loss, lr):
        """Call after each optimizer step with this rank's loss (a tensor). Returns True at the last step."""
        args = self.args
        self.global_step += 1
        loss = loss.detach().float()
        self.first_bad_step = torch.minimum(self.first_bad_step, torch.where(loss.isfinite(), NEVER, self.global_step))
        end_of_epoch = step + 1 == self.steps_per_epoch
        if self.global_step % args.print_freq == 0 or end_of_epoch or self.done():
            self.stop_if_diverged()
            loss_value = all_reduce_mean(loss).item()  # the only host sync, at print time
            elapsed = max(time.time() - self.tick[0], 1e-9)
            img_per_s = (self.global_step - self.tick[1]) * args.batch_size / elapsed
            hours, rest = divmod(int((self.last_step - self.global_step) * args.batch_size / max(img_per_s, 1e-9)), 3600)
            print0(f"epoch {epoch} step {step + 1}/{self.steps_per_epoch} loss {loss_value:.4f} lr {lr:.4g} "
                   f"{img_per_s:.0f} img/s eta {hours}:{rest // 60:02d}:{rest % 60:02d}", rank=self.rank)
            self.log(epoch=epoch, step=self.global_step, loss=loss_value, lr=lr, img_per_s=img_per_s)
            self.tick = (time.time(), self.global_step)
        if end_of_epoch or self.done() or (args.save_every and self.global_step % args.save_every == 0):
            self.save(epoch + 1 if end_of_epoch else epoch, 0 if end_of_epoch else step + 1)
        if end_of_epoch and args.eval_every and (epoch + 1) % args.eval_every == 0 and not self.done():
            monitor = self.evaluate(linear=False)
            self.log(epoch=epoch + 1, **monitor)
            print0(f"epoch {epoch + 1} kNN top-1 {monitor['knn_top1']:.2f}", rank=self.rank)
            self.tick = (time.time(), self.global_step)  # evaluation time is not training throughput
        return self.done()

    def stop_if_diverged(self, check_weights=False):
        """One-line error naming the first non-finite step and the last good checkpoint (all ranks agree)."""
        first_bad = self.first_bad_step.clone()
        if check_weights:
            values = [t for t in self.model.state_dict().values() if t.is_floating_point()]
            finite = torch.stack([t.isfinite().all() for t in values]).all()
            first_bad = torch.where(finite, first_bad, torch.clamp(first_bad, max=self.global_step))
        if is_distributed():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        if first_bad.item() < NEVER:
            good = (f"the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})" if self.last_good
                    else "no checkpoint was written")
            fail(f"training diverged: non-finite loss or weights at step {first_bad.item()}; {good}; "
                 "lower --lr and --resume from it")

    def save(self, epoch, step_in_epoch):
        """Atomic checkpoint.pth + backbone.pth from rank 0; never of non-finite values."""
        self.stop_if_diverged(check_weights=True)
        if self.rank == 0:
            save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                         "step_in_epoch": step_in_epoch, "global_step": self.global_step,
                         "world_size": self.world_size, "args": vars(self.args)}, self.path)
            save_atomic(self.backbone.state_dict(), os.path.join(self.args.out, "backbone.pth"))
        self.last_good, self.epochs_done = (self.path, self.global_step), epoch
        self.tick = (time.time(), self.global_step)

    def log(self, **record):  # one JSON object per line in OUT/metrics.jsonl
        if self.rank == 0:
            with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self, linear=True):
        return evaluate(self.backbone, *self.probe_loaders, self.device, self.args, linear)

    def baselines(self):
        """The same probes on the random-init trunk and, for images of <= 64 px, on the raw (normalised) pixels."""
        trained = copy.deepcopy(self.backbone.state_dict())
        self.backbone.load_state_dict(self.initial_backbone)
        results = {f"random_init_{k}": v for k, v in self.evaluate().items()}
        self.backbone.load_state_dict(trained)
        if self.args.image_size <= 64:
            pixels = evaluate(nn.Flatten(), *self.probe_loaders, self.device, self.args)
            results.update({f"raw_pixels_{k}": v for k, v in pixels.items()})
        return results

    def final_evaluation(self, extra=None):
        """kNN + linear probe of the trunk, `extra()` (a method's own results), the replicas' weight difference."""
        results = self.evaluate()
        results.update(extra() if extra else {})
        if self.initial_backbone is not None:
            results.update(self.baselines())
        if self.world_size > 1:
            results["rank_weight_max_diff"] = max_param_diff_across_ranks(self.model)
        self.log(epoch=self.epochs_done, step=self.global_step, **results)
        print0(" ".join(f"{k} {v:.4g}" for k, v in results.items()), rank=self.rank)
        return results


# ---- Probing: feature extraction, weighted kNN, linear probe ---------------------------
@torch.no_grad()
def extract_features(trunk, loader, device, amp=False):
    """Frozen trunk in eval mode over a deterministic loader; every rank gets all (features, labels)."""
    was_training = trunk.training
    trunk.eval()
    feats, labels, indices = [], [], []
    for x, y, i in loader:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            feats.append(trunk(x).float())
        labels.append(y.to(device))
        indices.append(i.to(device))
    trunk.train(was_training)
    feats, labels, indices = gather(torch.cat(feats)), gather(torch.cat(labels)), gather(torch.cat(indices))
    # DistributedSampler pads the last ranks with repeats: write by index to drop them
    n = len(loader.dataset)
    out_f, out_y = feats.new_empty(n, feats.shape[1]), labels.new_empty(n)
    out_f[indices], out_y[indices] = feats, labels
    return out_f, out_y


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=200, t=0.1, chunk=1024):
    """Weighted kNN of Wu et al. 2018 (InstDisc): top-k cosine neighbours vote with exp(sim / t).
    Returns top-1 accuracy in percent."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = torch.zeros((), device=test_f.device)
    for s in range(0, len(test_f), chunk):
        sim, idx = (test_f[s:s + chunk] @ train_f.T).topk(min(k, len(train_f)), dim=1)  # (b, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[s:s + chunk]).sum()
    return 100.0 * correct.item() / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=0.1, batch_size=256, seed=0):
    """Linear classifier on cached frozen features -> (top-1, top-5) in percent. Standardised inputs (as MAE's
    parameter-free BN), weights N(0, 0.01), bias 0, SGD momentum 0.9, cosine lr, no weight decay."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    head = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    steps = max(1, epochs * ((len(train_f) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(train_f), generator=g).to(train_f.device)
        for s in range(0, len(train_f), batch_size):
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(head(train_f[b]), train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        top5 = head(test_f).topk(min(5, num_classes), dim=1).indices
    top1 = (top5[:, 0] == test_y).float().mean().item() * 100
    top5 = (top5 == test_y[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def evaluate(trunk, probe_train_loader, probe_test_loader, device, args, linear=True):
    """kNN (and optionally linear-probe) accuracy of a frozen trunk; same result on every rank."""
    if is_distributed():  # BN running stats drift apart without SyncBN (CPU): use rank 0's, as DDP does
        for buffer in trunk.buffers():
            dist.broadcast(buffer, 0)
    train_f, train_y = extract_features(trunk, probe_train_loader, device, args.amp)
    test_f, test_y = extract_features(trunk, probe_test_loader, device, args.amp)
    results = {"knn_top1": knn_classify(train_f, train_y, test_f, test_y, args.knn_k, args.knn_t)}
    if linear and args.probe_epochs > 0:
        results["linear_top1"], results["linear_top5"] = linear_probe(train_f, train_y, test_f, test_y,
                                                                      args.probe_epochs, seed=args.seed)
    return results


def print0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)
