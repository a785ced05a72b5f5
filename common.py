"""Shared plumbing for the sslref method files: data, distributed start-up, gathers,
backbones, checkpoints, metrics and probing (kNN + linear probe). Nothing method-specific."""
import argparse
import copy
import functools
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
from PIL import Image, ImageFilter  # Pillow comes with torchvision
from torchvision import transforms as T
from torchvision.transforms import functional as TF


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


class BadImage(Exception):
    """An image file that does not decode; the loaders turn it into a one-line error."""


def decode_image(path, root):
    """ImageFolder's PIL loader (RGB, decoded once per sample for all its views); a file PIL cannot decode raises
    BadImage naming it relative to --data."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # truncated, not an image, corrupt headers
        raise BadImage(f"cannot decode {os.path.relpath(path, root)} under --data ({e}); replace or delete it") from None


def image_folder(root, split):
    path = os.path.join(root or "", split)
    if not os.path.isdir(path):
        fail(f"no folder {path}: --dataset imagefolder expects DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg; "
             "check --data or pick another --dataset")
    try:
        return torchvision.datasets.ImageFolder(path, loader=functools.partial(decode_image, root=root))
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


# ---- Augmentation: geometry in the data workers, photometric ops batched on the device ----------------
# A method's training transform runs in two stages. The workers decode each image once, apply its geometry (crops and
# flips, PIL) to every view, and draw every parameter of the photometric ops from the per-sample seed (torchvision's
# get_params, so the same distributions); they hand uint8 tensors over. The device then applies colour jitter,
# grayscale and blur to the whole batch, each sample with its own parameters, and normalises. With
# --no-device-augment the workers apply the same ops with PIL from the same parameters, as the official loaders do.
# Each op has draw() (in the worker), pil(image, q) (the CPU path) and batch(x, q): x (B, 3, H, W) floats in [0, 1], the
# parameters q (B, params); on CPU, batch() overwrites x (Augmentation owns it), to save a copy per op.
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
        if q[0]:
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for i in q[1:5].long().tolist():
                image = adjust[i](image, q[5 + i].item())
        return image

    def batch(self, x, q):
        """x (B, 3, H, W) in [0, 1]. Brightness, contrast and saturation are torchvision's blends with 0, the mean grey
        level or the grey image; hue shifts the HSV hue, once per sample: the ops before it, hue, the ops after it."""
        order, factors = torch.where(q[:, :1] > 0, q[:, 1:5].long(), -1), q[:, 5:]  # not applied: every slot empty
        hue_at = (order == 3).int().argmax(1)  # (B,); 0 when not applied
        for slot in range(3):  # up to three ops before the hue
            x = _where(x, (slot < hue_at), _blend_slot, order[:, slot], factors)
        x = _where(x, (order[:, 0] >= 0) & (factors[:, 3] != 0), _adjust_hue, factors[:, 3])  # hue 0: no jitter
        for slot in range(1, 4):  # and after it
            x = _where(x, (slot > hue_at) & (order[:, 0] >= 0), _blend_slot, order[:, slot], factors)
        return x


def _per_sample(v):
    return v[:, None, None, None]


def _where(x, applied, fn, *per_sample):
    """fn(x, *per_sample) for the samples where `applied` (B,), x for the others. On CUDA all samples are computed and
    torch.where picks (no host sync); on CPU only the applied ones (nothing to sync with, as PIL), written into x."""
    if x.device.type != "cpu":
        return torch.where(_per_sample(applied), fn(x, *per_sample), x)
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
    factor = factors.gather(1, op.clamp(min=0)[:, None])[:, 0]  # (B,)
    grey = _grey(x)
    contrast, saturation = (op == 1) * (1 - factor), (op == 2) * (1 - factor)  # the reference's weights
    reference = torch.addcmul(_per_sample(grey.mean((1, 2, 3)) * contrast), grey, _per_sample(saturation))
    return torch.addcmul(reference, x, _per_sample(factor)).clamp_(0, 1)


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
        if torch.rand(1) > self.p:
            return torch.tensor([0.0, 1.0])
        return torch.tensor([1.0, T.GaussianBlur.get_params(*self.sigma)])

    def pil(self, image, q):
        return image.filter(ImageFilter.GaussianBlur(radius=q[1].item())) if q[0] else image

    def batch(self, x, q):
        return _where(x, q[:, 0] > 0, lambda x, sigma: _gaussian_blur(x, sigma, self.kernel_size // 2), q[:, 1])


def _gaussian_blur(x, sigma, r):
    """x (B, C, H, W) blurred with each sample's Gaussian of std sigma (B,), 2r + 1 taps, reflect padding: rows then
    columns (2 x (2r + 1) multiply-adds a pixel, where the 2-D kernel takes (2r + 1)^2)."""
    B, C, H, W = x.shape
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kernel = (-0.5 * (t / sigma[:, None]) ** 2).exp()
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B C, 2r + 1): a group per channel
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)
    return F.conv2d(y, kernel[:, None, :, None], groups=B * C).view(B, C, H, W)


class Augmentation:
    """image -> `views` views: (uint8 (V, 3, S, S), photometric parameters (V, P)). `geometry`: torchvision
    transforms on the PIL image (crop, flip); `photometric`: the ops above, in order. `to_device` finishes a batch."""

    def __init__(self, args, geometry, photometric=(), views=1):
        self.geometry, self.photometric, self.views = T.Compose(geometry), list(photometric), views
        self.on_device, self.dataset, self.mean_std = getattr(args, "device_augment", True), args.dataset, {}

    def __call__(self, image):
        images, params = [], []
        for _ in range(self.views):
            view = self.geometry(image)
            q = [op.draw() for op in self.photometric]
            if not self.on_device:  # the CPU path: PIL does it here, from the same parameters
                for op, qi in zip(self.photometric, q):
                    view = op.pil(view, qi)
            images.append(TF.pil_to_tensor(view))
            params.append(torch.cat(q) if q else torch.zeros(0))
        return torch.stack(images), torch.stack(params)

    def to_device(self, batch, device):
        """(uint8 (B, V, 3, S, S), parameters (B, V, P)) from the loader -> (V B, 3, S, S) float on the device, view by
        view (view 0 of all samples, then view 1, ...), photometric ops applied (device path) and normalised."""
        x, params = (t.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1) for t in batch)
        x = x.float().div_(255)
        if self.on_device and self.photometric and device.type == "cpu":  # 8 views at a time: they stay in cache
            for s in range(0, len(x), 8):
                x[s:s + 8] = self.photometric_ops(x[s:s + 8], params[s:s + 8])
        elif self.on_device and self.photometric:
            x = self.photometric_ops(x, params)
        if device not in self.mean_std:  # copied to the device once, not every step (a copy waits for the GPU)
            self.mean_std[device] = [torch.tensor(v, device=device)[None, :, None, None] for v in MEAN_STD[self.dataset]]
        mean, std = self.mean_std[device]
        x = x.sub_(mean).div_(std)
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    def photometric_ops(self, x, params):
        for op, q in zip(self.photometric, params.split([op.params for op in self.photometric], dim=1)):
            x = op.batch(x, q)
        return x


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


class Loader(torch.utils.data.DataLoader):
    """DataLoader whose undecodable image stops the run with one line (a worker re-raises it with its traceback)."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except BadImage as e:
                fail(str(e).strip().splitlines()[-1].split("BadImage: ")[-1])
            yield batch


def train_loader(dataset, args, world_size, rank):
    sampler = EpochSampler(dataset, args.batch_size // world_size, num_replicas=world_size, rank=rank, shuffle=True,
                           seed=args.seed, drop_last=True)
    if len(sampler) < sampler.batch_size:
        fail(f"{len(dataset)} training images give no full batch of {args.batch_size}; lower --batch-size or raise --subset")
    loader = Loader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=args.workers > 0)
    return loader, sampler


def eval_loader(dataset, args, world_size, rank):
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world_size, rank, shuffle=False)
    return Loader(dataset, batch_size=max(1, args.batch_size // world_size), sampler=sampler,
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
        # --monitor-subset: the --eval-every kNN reads a fixed, class-balanced part of each probe set (seconds on
        # ImageNet, not a full pass); the final evaluation reads everything
        self.monitor_loaders = probe_loaders
        if getattr(args, "monitor_subset", 0):
            self.monitor_loaders = tuple(
                eval_loader(torch.utils.data.Subset(loader.dataset, balanced_subset(dataset_labels(loader.dataset),
                                                                                    args.monitor_subset)),
                            args, world_size, rank) for loader in probe_loaders)
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
            memory = {"peak_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30} if self.device.type == "cuda" else {}
            print0(f"epoch {epoch} step {step + 1}/{self.steps_per_epoch} loss {loss_value:.4f} lr {lr:.4g} "
                   f"{img_per_s:.0f} img/s eta {hours}:{rest // 60:02d}:{rest % 60:02d}"
                   + "".join(f" peak {v:.1f} GiB" for v in memory.values()), rank=self.rank)
            self.log(epoch=epoch, step=self.global_step, loss=loss_value, lr=lr, img_per_s=img_per_s, **memory)
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

    def evaluate(self, linear=True):  # linear=False: the monitor
        return evaluate(self.backbone, *(self.probe_loaders if linear else self.monitor_loaders), self.device,
                        self.args, linear)

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


# ---- Probing: sharded features, weighted kNN, linear probe --------------------------------
# Each rank keeps only the features of its own share of the probe sets (ImageNet, ResNet-50, 8 ranks: 1.28M x 2048
# in fp16 is 0.66 GB per GPU, where every rank holding all of them in fp32 was 10.5 GB, twice during the gather).
KNN_MEMORY_BYTES = 2 ** 30  # the kNN's working set per rank, whatever the dataset size


def world():
    return dist.get_world_size() if is_distributed() else 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def across_ranks(x, op=dist.ReduceOp.SUM):
    """x reduced over the ranks (a copy; x itself in one process)."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def extract_features(trunk, loader, device, amp=False):
    """Frozen trunk in eval mode over a deterministic DistributedSampler loader -> this rank's share only:
    (features, labels, dataset indices), in ascending index order, without the sampler's padding. Features are
    fp16 on CUDA (rounding a SimCLR trunk's Fashion-MNIST features to fp16 moved kNN from 73.21 to 73.17
    and left the linear probe at 81.55) and fp32 on CPU, written into one preallocated tensor."""
    was_training = trunk.training
    trunk.eval()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sampler, feats, filled = loader.sampler, None, 0
    labels, indices = torch.empty(len(sampler), dtype=torch.long), torch.empty(len(sampler), dtype=torch.long)
    for x, y, i in loader:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            f = trunk(x)
        if feats is None:
            feats = torch.empty(len(sampler), f.shape[1], dtype=dtype, device=device)
        feats[filled:filled + len(f)] = f
        labels[filled:filled + len(f)], indices[filled:filled + len(f)] = y, i
        filled += len(f)
    trunk.train(was_training)
    # DistributedSampler repeats the first samples to even out the ranks: rank r's i-th sample sits at position
    # r + i * world of the padded list, so the repeats are this rank's last positions past the dataset's end
    keep = min(filled, max(0, -(-(len(loader.dataset) - sampler.rank) // sampler.num_replicas)))
    return feats[:keep], labels[:keep].to(device), indices[:keep].to(device)


def _pad_rows(x, rows, value=0):
    return torch.cat([x, x.new_full((rows - len(x), *x.shape[1:]), value)]) if len(x) < rows else x


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k=200, t=0.1, train_index=None, memory_bytes=None):
    """Weighted kNN of Wu et al. 2018 (InstDisc): top-k cosine neighbours vote with exp(sim / t). Sharded: each
    rank passes its share of both sets (train_index: the global indices of its train rows, for the tie-break);
    the ranks score each gathered test chunk against their own train rows, keep their top-k (similarity, label),
    and merge those into the global top-k, ties going to the lower train index. The chunk is sized so the
    similarity matrix, its masks and the merge stay within memory_bytes. Returns top-1 in percent, the same on
    every rank, and exactly one process's result on CPU (on GPU, cuBLAS may round a dot product of a shard-shaped
    matmul differently in the last bit, which can reorder near-ties)."""
    device, w = test_f.device, world()
    if train_index is None:  # the sampler's layout: rank r holds r, r + w, r + 2w, ...
        train_index = rank() + w * torch.arange(len(train_f), device=device)
    train_index = train_index.to(device)
    if (train_index.diff() < 0).any():  # ascending global index, so that ties can go to the lower index
        order = train_index.argsort()
        train_f, train_y, train_index = train_f[order], train_y[order], train_index[order]
    # cosine similarity without a normalised copy of the train features: divide the dot products by their norms
    train_norm = torch.cat([train_f[s:s + 65536].float().norm(dim=1) for s in range(0, len(train_f), 65536)]
                           + [train_f.new_zeros(0, dtype=torch.float)]).clamp_min(1e-12)
    test_f = F.normalize(test_f.float(), dim=1).to(train_f.dtype)
    counts = torch.tensor([len(train_f), len(test_f)], device=device)
    n_train, n_test = across_ranks(counts).tolist()
    max_train, max_test = across_ranks(counts, dist.ReduceOp.MAX).tolist()
    num_classes = int(across_ranks(torch.cat([train_y, test_y, train_y.new_zeros(1)]).max(), dist.ReduceOp.MAX)) + 1
    k, kmax = min(k, n_train), min(k, max_train)  # each rank sends kmax candidates per query
    memory_bytes = memory_bytes or KNN_MEMORY_BYTES
    if device.type == "cuda":  # and never more than half of what the GPU has free
        memory_bytes = min(memory_bytes, torch.cuda.mem_get_info(device)[0] // 2)
    # per query: 16 bytes per similarity (fp32 value, bool masks, int32 cumsum), ~48 per merged candidate
    chunk = max(1, min(max_test, memory_bytes // (w * (16 * max(1, max_train) + 48 * w * kmax))))
    chunk = int(across_ranks(torch.tensor(chunk, device=device), dist.ReduceOp.MIN))  # one chunk size for all
    chunk = -(-max_test // -(-max_test // chunk)) if max_test else 1  # the same chunks, evened out
    correct = torch.zeros((), device=device)
    for s in range(0, max_test, chunk):
        mine = test_f[s:s + chunk]
        queries = gather(_pad_rows(mine, chunk)) if w > 1 else mine  # (w * chunk, D): every rank's chunk
        labels = gather(_pad_rows(test_y[s:s + chunk], chunk, -1)) if w > 1 else test_y[s:s + chunk]
        sim = ((queries @ train_f.T).float() / train_norm).nan_to_num_(nan=-float("inf"))  # (rows, my train rows)
        kk = min(k, len(train_f))
        if kk:  # this rank's top-kk, exactly: all above the kk-th value, then its ties in index order
            threshold = sim.topk(kk, dim=1).values[:, -1:]
            above, tied = sim > threshold, sim == threshold
            take = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= kk - above.sum(1, keepdim=True)))
            idx = take.nonzero()[:, 1].view(len(sim), kk)
            cand = (sim.gather(1, idx), train_index[idx], train_y[idx])
        else:
            cand = (sim.new_empty(len(sim), 0), train_index.new_empty(len(sim), 0), train_y.new_empty(len(sim), 0))
        # every rank sends exactly kmax candidates per query (-inf pads a rank with fewer train rows)
        cand = [_pad_rows(c.T, kmax, v).T for c, v in zip(cand, (-float("inf"), n_train, 0))]
        if w > 1:
            cand = [torch.cat(gather(c[None]).unbind(0), dim=1) for c in cand]  # (rows, w * kmax)
        cand_sim, cand_index, cand_y = cand
        by_index = cand_index.argsort(dim=1)  # merge: sort by index, then stably by similarity
        by_sim = cand_sim.gather(1, by_index).argsort(dim=1, descending=True, stable=True)[:, :k]
        top = by_index.gather(1, by_sim)
        votes = torch.zeros(len(sim), num_classes, device=device)
        votes.scatter_add_(1, cand_y.gather(1, top), (cand_sim.gather(1, top) / t).exp())
        correct += ((votes.argmax(1) == labels) & (labels >= 0)).sum()
    return 100.0 * correct.item() / n_test


def _column_stats(train_f, rows=8192):
    """Mean and (unbiased) std of the features over all ranks' rows, in fp32 blocks (no fp32 copy of the set)."""
    count = across_ranks(torch.tensor(float(len(train_f)), device=train_f.device))
    total = sum((train_f[s:s + rows].float().sum(0) for s in range(0, len(train_f), rows)),
                torch.zeros(train_f.shape[1], device=train_f.device))
    mean = across_ranks(total) / count
    squares = sum((((train_f[s:s + rows].float() - mean) ** 2).sum(0) for s in range(0, len(train_f), rows)),
                  torch.zeros(train_f.shape[1], device=train_f.device))
    return mean, (across_ranks(squares) / (count - 1)).sqrt() + 1e-6


def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=0.1, batch_size=256, seed=0):
    """Linear classifier on cached frozen features -> (top-1, top-5) in percent. Standardised inputs (as MAE's
    parameter-free BN), weights N(0, 0.01), bias 0, SGD momentum 0.9, cosine lr, no weight decay. Sharded: each
    rank steps through its own rows, batch_size / world at a time; the gradients, summed across ranks, are those of
    the mean loss over the whole step's rows."""
    device, w, r = train_f.device, world(), rank()
    g = torch.Generator(device="cpu").manual_seed(seed)
    num_classes = int(across_ranks(torch.cat([train_y, test_y, train_y.new_zeros(1)]).max(), dist.ReduceOp.MAX)) + 1
    mean, std = _column_stats(train_f)
    head = nn.Linear(train_f.shape[1], num_classes).to(device)
    with torch.no_grad():  # the same initial head on every rank
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    if r:  # each rank its own order of its rows (rank 0 keeps the one-process sequence)
        g.manual_seed(seed + 1000003 * r)
    local_batch = max(1, -(-batch_size // w))
    lengths = gather(torch.tensor([len(train_f)], device=device)).tolist() if w > 1 else [len(train_f)]
    steps_per_epoch = max(1, -(-max(lengths) // local_batch))
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        perm = torch.randperm(len(train_f), generator=g).to(device)
        for s in range(steps_per_epoch):
            b = perm[s * local_batch:(s + 1) * local_batch]  # short or empty on a rank whose rows ran out
            rows = sum(min(local_batch, max(0, n - s * local_batch)) for n in lengths)  # this step's, all ranks
            logits = head((train_f[b].float() - mean) / std)
            loss = F.cross_entropy(logits, train_y[b], reduction="sum") / max(1, rows)  # the global batch mean
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if w > 1:  # the sum over ranks is the gradient of the global batch's mean: one all-reduce per step
                grads = torch.cat([p.grad.flatten() for p in head.parameters()])
                dist.all_reduce(grads)
                for p, grad in zip(head.parameters(), grads.split([p.numel() for p in head.parameters()])):
                    p.grad.copy_(grad.view_as(p))
            opt.step()
            sched.step()
    correct = torch.zeros(2, device=device)
    with torch.no_grad():
        for s in range(0, len(test_f), 65536):
            top5 = head((test_f[s:s + 65536].float() - mean) / std).topk(min(5, num_classes), dim=1).indices
            y = test_y[s:s + 65536, None]
            correct += torch.stack([(top5[:, :1] == y).sum(), (top5 == y).sum()])
    correct = across_ranks(correct) / across_ranks(torch.tensor(float(len(test_f)), device=device))
    return (correct[0].item() * 100, correct[1].item() * 100)


def balanced_subset(labels, n):
    """Indices spread evenly over each class's samples, n / classes per class (at least one, so more than n when
    n < classes), sorted: a function of the labels alone, so the same on every rank and every epoch."""
    classes = labels.unique()
    per_class = max(1, n // len(classes))
    picked = []
    for c in classes:
        members = (labels == c).nonzero()[:, 0]
        picked.append(members[torch.linspace(0, len(members) - 1, min(per_class, len(members))).round().long()])
    return torch.cat(picked).sort().values.tolist()


def evaluate(trunk, probe_train_loader, probe_test_loader, device, args, linear=True):
    """kNN (and optionally linear-probe) accuracy of a frozen trunk; same result on every rank."""
    if is_distributed():  # BN running stats drift apart without SyncBN (CPU): use rank 0's, as DDP does
        for buffer in trunk.buffers():
            dist.broadcast(buffer, 0)
    train_f, train_y, train_index = extract_features(trunk, probe_train_loader, device, args.amp)
    test_f, test_y, _ = extract_features(trunk, probe_test_loader, device, args.amp)
    results = {"knn_top1": knn_classify(train_f, train_y, test_f, test_y, args.knn_k, args.knn_t, train_index)}
    if linear and args.probe_epochs > 0:
        results["linear_top1"], results["linear_top5"] = linear_probe(train_f, train_y, test_f, test_y,
                                                                      args.probe_epochs, seed=args.seed)
    return results


def print0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)
