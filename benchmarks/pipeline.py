"""Where the input pipeline's time goes at the size users run: ImageNet-like JPEGs, 224 px, each method's own transform.

    python benchmarks/pipeline.py                                   # CPU: the tables below, one thread per figure
    python benchmarks/pipeline.py --workers 16 --train-steps 30     # on a GPU node: + training steps, loaded vs not

It writes JPEGs of 500x375 px at quality 90 (about 75 KB, as ImageNet's average photo) into a temporary ImageFolder, then reports per method, in samples (images) per second:
- worker: what one data worker does per sample on one thread with the device stage on: JPEG decode, the crops and
  flips of every view, the photometric parameters drawn, uint8 tensors out;
- cpu path: the same with --no-device-augment, the colour ops done with PIL in the worker (the official loaders' way);
- device stage: the batched colour ops + normalisation of one batch of --batch-size, as ms per image, on CPU tensors
  (one thread) and on CUDA when there is one, beside the PIL colour ops it replaces (cpu path - worker, per image);
- loader: the real DataLoader with --workers workers, end to end (uint8 batches + the device stage);
- with --train-steps on CUDA: the method's own training loop (--arch, bf16, channels_last) fed by that loader, against
  the same loop on one batch already on the device; their ratio says whether the step is data-bound (< 1).
"""
import argparse
import functools
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import speed  # noqa: E402

# name -> (method file, its augmentation function, flags): the two-view and the one-view methods with colour ops
CONFIGS = {
    "simclr": ("simclr", "simclr_augmentation", []),
    "moco v1": ("moco", "moco_augmentation", []),
    "moco v2": ("moco", "moco_augmentation", ["--aug-plus", "--mlp", "--moco-t", "0.2", "--cos"]),
    "instdisc": ("instdisc", "instdisc_augmentation", []),
    "rotation": ("rotation", "rotation_augmentation", []),
    "byol": ("byol", "byol_augmentation", []),  # two groups: blur and solarize drawn per view
    "simsiam": ("simsiam", "simsiam_augmentation", []),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=512, help="training JPEG files (more with --train-steps on CUDA)")
    p.add_argument("--photos", type=int, default=64, help="distinct photos among them")
    p.add_argument("--samples", type=int, default=96, help="samples timed per single-thread figure")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the device stage and the loader")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers")
    p.add_argument("--loader-batches", type=int, default=6, help="batches timed through the loader (after one)")
    p.add_argument("--train-steps", type=int, default=0, help="CUDA: timed training steps, loaded and not (0: skip)")
    p.add_argument("--arch", default="resnet50", help="trunk of the training steps")
    p.add_argument("--out", default="", help="write the JPEGs here and keep them (default: a temporary folder)")
    return p.parse_args(argv)


def photo(i, w=500, h=375):
    """A deterministic stand-in for a photo: colour noise with a 1/f-like spectrum (octaves of upsampled noise,
    channels correlated), which JPEG compresses to about 75 KB at quality 90, as ImageNet's photos."""
    g = torch.Generator().manual_seed(i)
    x = torch.zeros(1, 3, h, w)
    for octave, side in enumerate((3, 6, 12, 24, 48, 96, 192, 384)):
        noise = torch.randn(1, 3, side, max(2, side * w // h), generator=g)
        noise = 0.6 * noise + 0.8 * noise.mean(1, keepdim=True)
        x += 0.8 ** octave * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
    x = (x - x.mean()) / x.std() * 50 + 120
    return Image.fromarray(x[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy())


def write_jpegs(root, n, photos):
    """root/{train,val}/class_k/*.jpg: `photos` distinct photos, hard-linked to n training files (the loader reads n
    files, the page cache holds them as it would hold a hot ImageNet shard); returns their mean size in KB."""
    os.makedirs(root, exist_ok=True)
    sources = []
    for i in range(photos):
        sources.append(os.path.join(root, f"photo_{i}.jpg"))
        photo(i).save(sources[-1], quality=90)
    for split, count in (("train", n), ("val", 10)):
        for i in range(count):
            folder = os.path.join(root, split, f"class_{i % 10}")
            os.makedirs(folder, exist_ok=True)
            os.link(sources[i % photos], os.path.join(folder, f"{i}.jpg"))
    return sum(os.path.getsize(path) for path in sources) / photos / 1000


def method_args(name, root, image_size, batch_size):
    module_name, _, flags = CONFIGS[name]
    return __import__(module_name).parse_args(["--data", root, "--image-size", str(image_size), "--batch-size",
                                               str(batch_size), *flags])


def augmentation(name, args):
    module, function, _ = CONFIGS[name]
    return getattr(__import__(module), function)(args)


def one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def samples_per_s(dataset, n):
    """A data worker's rate: dataset[(index, epoch)] on one thread."""
    def run():
        dataset[(0, 0)]  # untimed: the first decode opens the file cache
        start = time.perf_counter()
        for i in range(n):
            dataset[(i % len(dataset), 0)]
        return n / (time.perf_counter() - start)
    return one_thread(run)


def device_stage_ms(aug, batch, device, repeats=3):
    """ms per sample (all its views) of aug.to_device on one collated batch (transfer included), best of `repeats`."""
    times = []
    for _ in range(repeats + 1):  # the first one warms up (CUDA context, kernels)
        speed.sync(device)
        start = time.perf_counter()
        aug.to_device(batch, device)
        speed.sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * min(times[1:]) / len(batch[0][0])  # the first group's views: (B, V, 3, S, S)


def loader_rate(dataset, args, device, aug):
    """Samples/s of the training DataLoader (common.Loader, as common.train_loader builds it) with args.workers
    workers, the device stage included, over --loader-batches batches after the first."""
    keys = [(i % len(dataset), 0) for i in range((args.loader_batches + 1) * args.batch_size)]
    loader = common.Loader(dataset, batch_size=args.batch_size, sampler=keys, num_workers=args.workers,
                           pin_memory=device.type == "cuda")
    batches = iter(loader)
    aug.to_device(next(batches)[0], device)  # workers started, first batch untimed
    speed.sync(device)
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        aug.to_device(next(batches)[0], device)
    speed.sync(device)
    return args.loader_batches * args.batch_size / (time.perf_counter() - start)


def train_rates(name, args, root, device):
    """(img/s of the method's own loop fed by the real loader, img/s of that loop on one batch already on the device).
    The window starts after 3 + 2 x workers steps, once the batches the workers queued during warm-up are used."""
    module_name, _, method_flags = CONFIGS[name]
    module = __import__(module_name)
    flags = ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--arch", args.arch,
             *method_flags]
    if module_name == "moco":
        flags += ["--moco-k", str(args.batch_size * (65536 // args.batch_size))]
    warm = 3 + 2 * args.workers
    marks = []
    after_step = common.Run.after_step

    def timed_after_step(run, epoch, step, loss, lr):
        if run.global_step + 1 in (warm, warm + args.train_steps):
            speed.sync(device)
            marks.append(time.perf_counter())
        return after_step(run, epoch, step, loss, lr)

    with tempfile.TemporaryDirectory() as out, speed.patched(common.Run, "after_step", timed_after_step), \
            speed.patched(common.Run, "final_evaluation", lambda run, extra=None: {}):
        module.main(flags + ["--data", root, "--workers", str(args.workers), "--epochs", "1", "--max-steps",
                             str(warm + args.train_steps), "--print-freq", str(10 ** 9), "--probe-epochs", "0",
                             "--out", out])
    loaded = args.batch_size * args.train_steps / (marks[1] - marks[0])
    speed_args = speed.parse_args(["--arch", args.arch, "--image-size", str(args.image_size), "--batch-size",
                                   str(args.batch_size), "--steps", str(args.train_steps)])
    on_device, _ = speed.measure_method(module_name, speed_args, device, method_flags)
    return loaded, on_device


class PILBlur:
    """The official MoCo loader's GaussianBlur: PIL's filter with a radius sigma uniform in [0.1, 2.0]."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


def official_moco_v2(image_size):
    """facebookresearch/moco main_moco.py's --aug-plus transform, two views, as its loader runs it (float out)."""
    T = torchvision.transforms
    one = T.Compose([T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                     T.RandomApply([PILBlur()], p=0.5), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(*common.MEAN_STD["imagefolder"])])
    return lambda image: (one(image), one(image))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or tmp
        images = args.images
        if cuda and args.train_steps:  # one epoch holds every step of the training runs (no epoch-end checkpoint)
            images = max(images, (4 + 2 * args.workers + args.train_steps) * args.batch_size)
        kb = write_jpegs(root, images, args.photos)
        base = torchvision.datasets.ImageFolder(os.path.join(root, "train"),
                                                loader=functools.partial(common.decode_image, root=root))
        decode = samples_per_s(common.Transformed(base, lambda image: None), args.samples)
        print(f"{images} JPEGs ({args.photos} distinct) of 500x375 px, {kb:.0f} KB on average; {args.image_size} px crops; "
              f"decode alone {decode:.0f} per s on one thread; loader: {args.workers} workers, batch {args.batch_size}"
              + (f"; {torch.cuda.get_device_name()}" if device.type == "cuda" else f"; {os.cpu_count()} CPU cores"))
        print("| method | worker samples/s per core | cpu path samples/s per core | PIL colour ops ms/sample "
              "| device stage ms/sample (CPU, 1 thread) |" + (" device stage samples/s (CUDA) |" if cuda else "")
              + " loader samples/s |" + (" train img/s loaded | on device | loaded / on device |" if cuda and
                                          args.train_steps else ""))
        print("|---" * (6 + cuda + (3 if cuda and args.train_steps else 0)) + "|")
        rows = []
        for name in args.methods:
            margs = method_args(name, root, args.image_size, args.batch_size)
            aug = augmentation(name, margs)
            dataset = common.Transformed(base, aug, seed=0)
            worker = samples_per_s(dataset, args.samples)
            margs.device_augment = False
            cpu_path = samples_per_s(common.Transformed(base, augmentation(name, margs), seed=0), args.samples)
            batch = torch.utils.data.default_collate([dataset[(i % len(base), 0)][0] for i in range(args.batch_size)])
            row = {"method": name, "worker": worker, "cpu_path": cpu_path, "pil_ms": 1000 / cpu_path - 1000 / worker,
                   "device_ms_cpu": one_thread(lambda: device_stage_ms(aug, batch, torch.device("cpu")))}
            line = (f"| {name} | {worker:.0f} | {cpu_path:.0f} | {row['pil_ms']:.2f} | {row['device_ms_cpu']:.2f} |")
            if cuda:
                row["device_img_s_cuda"] = 1000 / device_stage_ms(aug, batch, device)
                line += f" {row['device_img_s_cuda']:.0f} |"
            row["loader"] = loader_rate(dataset, args, device, aug)
            line += f" {row['loader']:.0f} |"
            if cuda and args.train_steps:
                row["train_loaded"], row["train_on_device"] = train_rates(name, args, root, device)
                line += (f" {row['train_loaded']:.0f} | {row['train_on_device']:.0f} | "
                         f"{row['train_loaded'] / row['train_on_device']:.2f} |")
            print(line, flush=True)
            rows.append(row)
        official = samples_per_s(common.Transformed(base, official_moco_v2(args.image_size), seed=0), args.samples)
        print(f"official MoCo v2 loader's transform (PIL ops, its ImageFilter blur, float views): {official:.0f} samples/s "
              "per core")
        rows.append({"method": "official moco v2", "cpu_path": official})
    return rows


if __name__ == "__main__":
    main()
