# Context prediction (relative position of patches): Doersch, Gupta, Efros, "Unsupervised Visual Representation
# Learning by Context Prediction", ICCV 2015 (arXiv:1505.05192). Sampling, shortcut defences and network as the
# official cdoersch/deepcontext (train.py); the optimiser as mmselfsup's ResNet-50 Relative-Loc config.
#
#   python relative_position.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 relative_position.py --data /imagenet              # 8 GPUs
#   python relative_position.py --data /imagenet --aberration project              # the paper's other defence
#
# Each image is rescaled to a random pixel budget, a 3x3 grid of patches (96 px, gaps of 48, each patch jittered by
# up to 7 px) is cut at a random place, and the network tells where each of the 8 outer patches lies relative to the
# centre: 8 pairs an image, every neighbour of the centre once (official: every adjacent pair of its grids). Other
# --image-size values scale the geometry by size / 224. The probe, as for every method, reads the trunk on whole images.
# Deliberate deviations: the optimiser (below); the mean cross-entropy over pairs (official: summed, at lr 1e-5); an
# image too small for the grid at its pixel budget is scaled up to fit (official: grids of fewer patches).
# Short runs (benchmarks/run.py): --batch-size 128 --lr 0.1 --fc-dim 1024 --warmup-epochs 0 --schedule (no drops).
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image  # Pillow comes with torchvision
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Relative-position (context prediction) pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # the official AlexNet solver (SGD, lr 1e-5 on a summed loss, no momentum, fixed, ~1M steps) does not transfer to
    # a ResNet, so mmselfsup's ResNet-50 recipe: 70 epochs, batch 512, lr 0.2 at 512 (0.1 per 256), wd 1e-4
    common.add_common_args(p, "relative_position", arch="resnet50", epochs=70, batch_size=512, lr=0.1, wd=1e-4)
    # ALGO LOGIC: relative-position hyper-parameters
    p.add_argument("--momentum", type=common.unit_float, default=0.9, help="SGD momentum (mmselfsup 0.9)")
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[30, 50], help="epochs where lr drops x0.1")
    p.add_argument("--warmup-epochs", type=common.nonneg_int, default=5, help="linear warm-up from 0.1 x lr (mmselfsup 5)")
    p.add_argument("--aberration", default="drop", choices=["drop", "project", "none"],
                   help="defence against chromatic aberration (Sec. 3.1): colour dropping (the released code's "
                        "only one), projection onto the plane without the green-magenta axis, or none")
    p.add_argument("--downsample", type=common.unit_float, default=0.33,
                   help="probability of downsampling a patch to 100-9025 px and back (Sec. 3.1; official 0.33)")
    p.add_argument("--fc-dim", type=common.positive_int, default=4096, help="width of fc6-fc8 (official 4096)")
    args = common.parse(p, argv)
    return args


# ALGO LOGIC: the patches (Sec. 3.1), cut in the data workers (seeded per sample by common.Transformed)
def pair_geometry(image_size):
    """(patch, gap, jitter, smallest downsampled side) in px: the paper's 96 / 48 / 7 / 10 at --image-size 224,
    scaled by image_size / 224 and rounded: 28 px (Fashion-MNIST) gives 12 / 6 / 1 / 1, 32 px 14 / 7 / 1 / 1."""
    def geometry(size):
        s = size / 224
        return round(96 * s), round(48 * s), round(7 * s), max(1, round(10 * s))
    patch, gap, jitter, smallest = geometry(image_size)  # gap > 2 jitter at every size: neighbours never touch
    if patch < 2:
        size = next(s for s in range(1, 1000) if geometry(s)[0] >= 2)
        common.fail(f"--image-size {image_size} gives {patch} px patches, too small to downsample or to tell apart; "
                    f"relative_position needs --image-size >= {size}")
    return patch, gap, jitter, smallest


def cut_grid(image, patch, gap, jitter):
    """image (C, H, W), large enough -> patches (9, C, patch, patch) in row-major grid order and their top-left
    corners (9, 2). The grid lies at a random place; each patch moves by -jitter..jitter px on each axis."""
    pitch, (H, W) = patch + gap, image.shape[1:]
    span = 2 * pitch + patch + 2 * jitter  # the grid with room for every patch's jitter
    origin = torch.stack([torch.randint(jitter, H - span + jitter + 1, ()), torch.randint(jitter, W - span + jitter + 1, ())])
    cells = torch.tensor([(r, c) for r in range(3) for c in range(3)]) * pitch
    corners = origin + cells + torch.randint(-jitter, jitter + 1, (9, 2))
    return torch.stack([image[:, y:y + patch, x:x + patch] for y, x in corners.tolist()]), corners


def downsample(patches, p, smallest):
    """Each patch with probability p: resized (bilinear) to a side s whose pixel count s^2 is uniform between
    smallest^2 and (patch-1)^2, then back (official prep_image: 10^2 to 95^2 at 96 px), so that fine detail, which a
    blurry target patch lacks, cannot be relied on. uint8 patches come back rounded to uint8."""
    out, size = patches.clone(), patches.shape[-1]
    for i in range(len(patches)):
        if torch.rand(()) < p:
            side = int(math.sqrt(torch.rand(()).item() * ((size - 1) ** 2 - smallest ** 2) + smallest ** 2))
            small = F.interpolate(patches[i:i + 1].float(), size=side, mode="bilinear", align_corners=False)
            back = F.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]
            out[i] = back.round().clamp(0, 255) if patches.dtype == torch.uint8 else back
    return out


class ContextPatches:
    """image -> (uint8 patches (9, 3, P, P) in grid order, kept colour channel per patch (9,)). The image is rescaled
    to a pixel count uniform in 150K-450K (official train.py; x (image_size / 224)^2), aspect kept, bilinear."""

    def __init__(self, args):
        self.patch, self.gap, self.jitter, self.smallest = pair_geometry(args.image_size)
        self.budget = [round(n * (args.image_size / 224) ** 2) for n in (150_000, 450_000)]
        self.span, self.downsample_p = 3 * self.patch + 2 * self.gap + 2 * self.jitter, args.downsample

    def rescaled_size(self, w, h):
        """(W, H) at a pixel count drawn from the budget; an image too small for the grid is scaled up to fit it
        (deviation: the official grids may hold fewer patches). The grid needs 398 px a side at 224 px, so a 4:3
        photo is scaled up for 20% of the draws, a 16:9 one for 44%."""
        pixels = torch.randint(self.budget[0], self.budget[1] + 1, ()).item()
        scale = max(math.sqrt(pixels / (w * h)), self.span / min(w, h))
        return max(self.span, round(w * scale)), max(self.span, round(h * scale))

    def __call__(self, image):
        (w, h), (W, H) = image.size, self.rescaled_size(*image.size)
        # only the grid's square of the rescaled image is made (PIL resizes that box of the original alone): the
        # square lies at a random place, and the grid, jitter included, fills it
        x0, y0 = torch.randint(W - self.span + 1, ()).item(), torch.randint(H - self.span + 1, ()).item()
        box = (x0 * w / W, y0 * h / H, (x0 + self.span) * w / W, (y0 + self.span) * h / H)
        square = image.convert("RGB").resize((self.span, self.span), resample=Image.BILINEAR, box=box)
        patches, _ = cut_grid(T.functional.pil_to_tensor(square), self.patch, self.gap, self.jitter)  # uint8
        kept_channel = torch.randint(3, (9,))  # colour dropping's choice, drawn here whatever --aberration is
        return downsample(patches, self.downsample_p, self.smallest), kept_channel


# ALGO LOGIC: the chromatic-aberration defences and the per-patch normalisation, batched on the device
def defend_and_normalise(patches, kept_channel, aberration, generator):
    """uint8 (b, 9, 3, P, P) -> floats. drop: the kept channel stays, the other two become uniform noise of one grey
    level (+-0.5 / 255, official); project: every pixel's colour loses its component along the green-magenta axis
    a = (-1, 2, -1), along which aberration shifts colour (Sec. 3.1): x - (a.x / a.a) a. Then each patch minus its
    mean (per channel) and divided by its RMS (official x 50 / RMS: unit scale here; a flat patch, RMS under one grey
    level, is not amplified). The noise comes from the step generator, drawn for the global batch."""
    x = patches.float() / 255
    if aberration == "project":
        r, g, b = x.unbind(2)
        along = (2 * g - r - b) / 6  # a.x / a.a
        x = x - torch.stack([-along, 2 * along, -along], 2)
    x = x - x.mean((3, 4), keepdim=True)
    if aberration == "drop":
        rank, world_size, b = common.rank(), common.world(), len(x)
        noise = torch.rand((world_size * b, *x.shape[1:]), generator=generator, device=x.device)[rank * b:(rank + 1) * b]
        keep = F.one_hot(kept_channel, 3).bool()[..., None, None]  # (b, 9, 3, 1, 1)
        x = torch.where(keep, x, (noise - 0.5) / 255)
    rms = x.pow(2).mean((2, 3, 4), keepdim=True).sqrt()
    return x / rms.clamp(min=1 / 255)


# ALGO LOGIC: late fusion (Fig. 3): the shared trunk per patch, fc6 per patch, concatenated pair, fc7, fc8, fc9 8-way
# label l: where neighbour l lies relative to the centre, rows pointing down (official pos2lbl, row-major)
OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
NEIGHBOURS = [3 * (1 + dy) + (1 + dx) for dy, dx in OFFSETS]  # their cells in the row-major 3x3 grid: 0-3, 5-8


class RelativePositionNet(nn.Module):
    def __init__(self, arch, image_size, fc_dim=4096):
        super().__init__()
        self.trunk, width = common.build_backbone(arch, image_size)  # stem chosen for the probe's image size
        # official: batch norm without scale or shift on conv3-conv5, fc6 and fc7 (its fix for a collapse to uniform
        # outputs); the ResNet's own batch norm stands in for the conv layers'

        self.fc6 = nn.Sequential(nn.Linear(width, fc_dim), nn.BatchNorm1d(fc_dim, affine=False), nn.ReLU(True))
        self.fc7 = nn.Sequential(nn.Linear(2 * fc_dim, fc_dim), nn.BatchNorm1d(fc_dim, affine=False), nn.ReLU(True))
        self.fc8 = nn.Sequential(nn.Linear(fc_dim, fc_dim), nn.ReLU(True))
        self.fc9 = nn.Linear(fc_dim, 8)

    def forward(self, patches):
        """patches (b, 9, C, P, P) -> logits (b, 8, 8): row l, the pair (centre, neighbour l); the target of row l is l."""
        b = patches.shape[0]
        f = self.fc6(self.trunk(patches.flatten(0, 1))).unflatten(0, (b, 9))  # one batch of 9b patches
        centre, neighbours = f[:, 4:5].expand(-1, 8, -1), torch.cat([f[:, :4], f[:, 5:]], 1)  # NEIGHBOURS, by slices
        pairs = torch.cat([centre, neighbours], 2).flatten(0, 1)  # (8b, 2 fc_dim): (centre, neighbour l) in row l
        return self.fc9(self.fc8(self.fc7(pairs))).unflatten(0, (b, 8))


def learning_rate(epoch, step, steps_per_epoch, args):
    """Linear warm-up from 0.1 x to the peak over --warmup-epochs (per step), then x0.1 at each --schedule epoch."""
    peak = args.lr * args.batch_size / 256
    if epoch < args.warmup_epochs:
        return peak * (0.1 + 0.9 * (epoch + step / steps_per_epoch) / args.warmup_epochs)
    return peak * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    pretrain_set, *probe_sets = common.build_datasets(args, ContextPatches(args))  # checks the geometry first

    # ALGO LOGIC: model and optimizer
    model = RelativePositionNet(args.arch, args.image_size, args.fc_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:  # per-GPU BN over that GPU's 9b patches
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=args.lr * args.batch_size / 256)

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, ((patches, kept_channel), _, _) in enumerate(loader, start=sampler.start_step):
            lr = learning_rate(epoch, step, steps_per_epoch, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            patches, kept_channel = patches.to(device, non_blocking=True), kept_channel.to(device, non_blocking=True)
            generator = common.step_generator(args.seed, run.global_step, device)
            x = defend_and_normalise(patches, kept_channel, args.aberration, generator)
            if device.type == "cuda":  # channels_last per patch: the trunk's (9b, C, P, P) view keeps it
                x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (len(x), 9))
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = ddp_model(x)
            position = torch.arange(8, device=device).repeat(len(x))  # row l of each image: neighbour l
            loss = F.cross_entropy(logits.flatten(0, 1).float(), position)  # mean over the 8b pairs
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if run.after_step(epoch, step, loss, lr):  # progress, checkpoints, monitor, divergence stop
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks
    return run.final_evaluation()


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
