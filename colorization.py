# Colorization, L => ab: Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016 (arXiv:1603.08511). Targets,
# rebalancing, loss and optimiser as the official richzhang/colorization (Caffe: resources/caffe_traininglayers.py,
# models/colorization_train_val_v2.prototxt, train/solver.prototxt).
#
#   python colorization.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 colorization.py --data /imagenet              # 8 GPUs
#
# The trunk sees only the lightness L of CIE Lab (its three input channels all carry (L - 50) / 100, as the official
# PyTorch port scales it, so conv1 keeps torchvision's shape and backbone.pth loads into torchvision); a decoder of
# up-convolutions predicts, at a quarter of the input's side (the paper's 56 x 56 at 224), a distribution over the
# quantised ab bins. The probe reads the trunk on the L of whole images, as the official transfer tests feed L only.
# Deliberate deviations: the ResNet trunk and its decoder instead of the paper's VGG-style net; the bins (see
# ab_bins: 322 at the paper's 5 neighbours; the released NNEncLayer uses 10); the loss is averaged over pixels
# (official: summed), which with Adam's coupled weight decay weighs the decay more against the data; the trunk starts
# from torchvision's init, where the official training starts from init_v2.caffemodel, a k-means data-dependent init
# (Krähenbühl et al. 2016, philkr/magic_init; train/readme step 1, train/train_model.sh -weights).
# Split-brain autoencoders (Zhang et al. 2017) are not here: they split the network in two halves of the channels,
# L => ab and ab => L, which a torchvision ResNet trunk does not offer without a second, half-width trunk.
# Short runs: --batch-size 64 --lr 1e-3 (Adam; the official 3e-5 is for 450K steps).
import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Colorization (L => ab) pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official solver: Adam lr 3e-5 (not scaled with the batch), beta 0.9 / 0.99, wd 1e-3, batch 40, x0.1 at 225K of
    # 450K steps = epochs 7 and 14 of ImageNet
    common.add_common_args(p, "colorization", arch="resnet50", epochs=14, batch_size=40, lr=3e-5, wd=1e-3,
                           lr_help="Adam lr, not scaled with the batch (official 3e-5)")
    # ALGO LOGIC: colorization hyper-parameters (Sec. 2.1-2.3)
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[7], help="epochs where lr drops x0.1")
    p.add_argument("--neighbours", type=common.positive_int, default=5,
                   help="bins each soft target spreads over (paper 5; the released NNEncLayer uses 10)")
    p.add_argument("--sigma", type=common.positive_float, default=5.0, help="Gaussian width of soft targets and prior smoothing")
    p.add_argument("--rebalance", type=common.unit_float, default=0.5, help="lambda: prior mixed with the uniform")
    p.add_argument("--temperature", type=common.positive_float, default=0.38, help="annealed-mean T for the pictures")
    p.add_argument("--prior-images", type=common.nonneg_int, default=0,
                   help="training images the ab prior is estimated on (0: all, as the paper's ImageNet prior)")
    args = common.parse(p, argv)
    if args.neighbours > 11:  # soft_encode looks at the 16 grid centres around a point: exact up to 11 nearest
        common.fail(f"--neighbours {args.neighbours}: at most 11 (paper 5, official 10)")
    if args.rebalance == 0:
        common.fail("--rebalance 0 weighs bins the prior barely reaches by up to 1e12; use a lambda above 0 (paper 0.5)")
    return args


# ALGO LOGIC: CIE Lab (D65, sRGB), in torch: the formulas skimage.color.rgb2lab uses, as the official training layer
RGB_TO_XYZ = [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
XYZ_TO_RGB = torch.linalg.inv(torch.tensor(RGB_TO_XYZ, dtype=torch.float64)).tolist()
WHITE = (0.95047, 1.0, 1.08883)  # D65


def mix_channels(matrix, x):
    """matrix (3 x 3 Python floats) times the colour of every pixel of x (..., 3, H, W): no tensor to copy to the
    device each step."""
    c = x.unbind(-3)
    return torch.stack([row[0] * c[0] + row[1] * c[1] + row[2] * c[2] for row in matrix], -3)


def rgb_to_lab(rgb):
    """sRGB in [0, 1], (..., 3, H, W) -> Lab: L in [0, 100], a and b about [-110, 110]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    xyz = mix_channels([[v / w for v in row] for row, w in zip(RGB_TO_XYZ, WHITE)], linear)  # relative to white
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -3)


def lab_to_rgb(lab):
    """Lab -> sRGB in [0, 1] (clipped: ab outside the gamut of that L has no sRGB colour)."""
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], -3)
    xyz = torch.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    linear = mix_channels([[v * w for v, w in zip(row, WHITE)] for row in XYZ_TO_RGB], xyz).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055).clamp(0, 1)


# ALGO LOGIC: the quantised ab space (Sec. 2.1: grid size 10, the in-gamut bins)
def ab_bins(grid=10, neighbours=5, levels=128):
    """The centres (Q, 2) of the ab grid cells that a soft target of some sRGB colour puts weight on: the union of
    each colour's `neighbours` nearest grid centres, 322 bins. The colours: the RGB cube's faces at `levels` steps
    (a colour's ab is also some surface colour's, the cube's boundary mapping onto the gamut's; 128 steps give the
    same 322 as all 16.7M 8-bit colours). The official pts_in_hull.npy, of unpublished derivation, holds 313 bins,
    all of them in this set; its 9 missing ones lie at the gamut's far corners."""
    v = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    u, w = (t.flatten() for t in torch.meshgrid(v, v, indexing="ij"))
    faces = [torch.stack([u, w][:axis] + [torch.full_like(u, value)] + [u, w][axis:])
             for axis in range(3) for value in (0.0, 1.0)]
    ab = rgb_to_lab(torch.cat(faces, 1)[:, :, None])[1:, :, 0].T  # (N, 2)
    offsets = torch.tensor([(i, j) for i in range(-1, 3) for j in range(-1, 3)], dtype=torch.float64) * grid
    candidates = torch.floor(ab / grid)[:, None] * grid + offsets  # the 16 centres around a point hold its nearest
    nearest = (candidates - ab[:, None]).pow(2).sum(-1).topk(neighbours, 1, largest=False).indices
    chosen = torch.gather(candidates, 1, nearest[..., None].expand(-1, -1, 2)).reshape(-1, 2)
    return chosen.unique(dim=0).round().float()  # sorted by a, then b, as the official file


def soft_encode(ab, lookup, neighbours, sigma):
    """ab (N, 2) -> (indices (N, k) of the k nearest bins, weights (N, k)): a Gaussian of width sigma on the distance,
    normalised to 1 (Sec. 2.1). The k nearest grid centres lie among the 16 around the point; `lookup` maps a grid
    position to its bin (-1 outside), so no distance to all Q bins is formed."""
    grid = lookup.grid
    candidates = torch.floor(ab / grid)[:, None] * grid + lookup.offsets  # (N, 16, 2)
    cell = ((candidates - lookup.origin) / grid).round().long().clamp(0, lookup.side - 1)
    index = lookup.table[cell[..., 0], cell[..., 1]]
    d2 = (candidates - ab[:, None]).pow(2).sum(-1).masked_fill(index < 0, math.inf)
    d2, nearest = d2.topk(neighbours, 1, largest=False)
    weights = torch.softmax(-d2 / (2 * sigma ** 2), 1)
    return torch.gather(index, 1, nearest), weights


class BinLookup(nn.Module):
    """The bins and a table from grid position to bin index, in buffers: they travel with the model and checkpoint."""

    def __init__(self, bins, grid=10):
        super().__init__()
        low, high = bins.min(0).values - 2 * grid, bins.max(0).values + 2 * grid
        self.grid, self.side = grid, int(((high - low).max() / grid).item()) + 1
        table = torch.full((self.side, self.side), -1, dtype=torch.long)
        cells = ((bins - low) / grid).round().long()
        table[cells[:, 0], cells[:, 1]] = torch.arange(len(bins))
        self.register_buffer("bins", bins)
        self.register_buffer("origin", low)
        self.register_buffer("table", table)
        offsets = torch.tensor([(i, j) for i in range(-1, 3) for j in range(-1, 3)], dtype=torch.float) * grid
        self.register_buffer("offsets", offsets, persistent=False)  # the 16 grid centres around a point's cell


# ALGO LOGIC: class rebalancing (Sec. 2.2): w proportional to ((1 - lambda) p~ + lambda / Q)^-1, E_p~[w] = 1
def rebalancing_weights(counts, bins, sigma, lam):
    """counts (Q,) of the training pixels' nearest bins -> (smoothed prior p~, weights w). p~: the empirical
    distribution smoothed with a Gaussian of width sigma over ab; the uniform covers the bins the prior reaches
    (official PriorFactor)."""
    p = counts / counts.sum()
    kernel = torch.exp(-torch.cdist(bins, bins).pow(2) / (2 * sigma ** 2))
    smooth = kernel @ p
    smooth = smooth / smooth.sum()
    seen = smooth > 0
    mix = (1 - lam) * smooth + lam * seen.float() / seen.sum()
    w = torch.where(seen, 1 / mix.clamp(min=1e-12), torch.zeros_like(mix))
    return smooth, w / (smooth * w).sum()


# ALGO LOGIC: model. The trunk on L, a decoder to Q logits at a quarter of the input's side
def lightness(rgb):
    """sRGB in [0, 1] -> the trunk's input: (L - 50) / 100 in each of the three channels."""
    return ((rgb_to_lab(rgb)[:, :1] - 50) / 100).expand(-1, 3, -1, -1)


def up_block(cin, cout):  # 4x4 stride-2 up-convolution, BN, ReLU (the official conv8's deconvolution)
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class Colorizer(nn.Module):
    def __init__(self, arch, image_size, bins):
        super().__init__()
        self.trunk, _ = common.build_backbone(arch, image_size)  # torchvision's init (official: k-means init; header)
        self.lookup = BinLookup(bins)
        self.register_buffer("prior", torch.zeros(len(bins)))  # p~, estimated from the training set before step 1
        self.register_buffer("weights", torch.ones(len(bins)))  # the rebalancing weight of each bin
        self.trunk.eval()  # measure the feature map without touching the BN statistics
        with torch.no_grad():
            channels, side = self.feature_map(torch.zeros(1, 3, image_size, image_size)).shape[1:3]
        self.trunk.train()
        self.out_size = max(1, image_size // 4)  # official: 56 x 56 logits for 224 px
        width, layers = min(256, channels), []
        layers += [nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(max(0, math.ceil(math.log2(self.out_size / side)))):
            layers.append(up_block(width, width))
        self.decoder = nn.Sequential(*layers, nn.Conv2d(width, len(bins), 1))  # official conv8_313: 1x1 to Q

    def feature_map(self, x):
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward(self, l_input):
        """(b, 3, S, S) lightness -> logits (b, Q, S/4, S/4)."""
        z = self.decoder(self.feature_map(l_input))
        if z.shape[-1] != self.out_size:  # e.g. 8 -> 7 at 28 px
            z = F.interpolate(z, size=self.out_size, mode="bilinear", align_corners=False)
        return z


class LightnessFeatures(nn.Module):
    """What the probe reads: the trunk on the L of the normalised probe image."""

    def __init__(self, trunk, dataset):
        super().__init__()
        self.trunk = trunk
        mean, std = (torch.tensor(v)[:, None, None] for v in common.MEAN_STD[dataset])
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x):
        return self.trunk(lightness((x * self.std + self.mean).clamp(0, 1)))


# ALGO LOGIC: loss. Rebalanced multinomial cross-entropy against the soft targets (Eq. 2)
def targets_and_weights(rgb, model, args):
    """rgb (b, 3, S, S) in [0, 1] -> (target indices, target weights) of each output pixel, and its rebalancing
    weight: w of its nearest bin, 0 for a grey image (no |a| or |b| above 5: official NonGrayMaskLayer)."""
    ab = rgb_to_lab(F.interpolate(rgb, size=model.out_size, mode="nearest"))[:, 1:]  # official: every 4th pixel
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    index, weight = soft_encode(flat, model.lookup, args.neighbours, args.sigma)
    colour = (ab.abs() > 5).flatten(1).any(1)
    pixel_weight = model.weights[index[:, 0]].reshape(len(rgb), -1) * colour[:, None]
    return index, weight, pixel_weight.flatten()


def rebalanced_cross_entropy(logits, index, weight, pixel_weight):
    """-sum_q Z_q log softmax(logits)_q per pixel, times its rebalancing weight, averaged over pixels."""
    log_p = F.log_softmax(logits.float().permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), 1)
    return -(pixel_weight * (torch.gather(log_p, 1, index) * weight).sum(1)).mean()


def annealed_mean(logits, bins, temperature):
    """Sec. 2.3: ab = the mean of softmax(logits / T) over the bin centres (T 0.38: between mode and mean)."""
    return torch.einsum("bqhw,qc->bchw", torch.softmax(logits.float() / temperature, 1), bins)


def colourise(l_rgb, logits, bins, temperature):
    """The input's own L with the predicted ab, upsampled bilinearly to its size -> sRGB in [0, 1]."""
    ab = F.interpolate(annealed_mean(logits, bins, temperature), size=l_rgb.shape[-1], mode="bilinear",
                       align_corners=False)
    return lab_to_rgb(torch.cat([rgb_to_lab(l_rgb)[:, :1], ab], 1))


def save_grid(rgb, logits, bins, args, path):
    """PNG with three rows: the grey input (L only), the colouring predicted from it, the original."""
    grey = lab_to_rgb(torch.cat([rgb_to_lab(rgb)[:, :1], torch.zeros_like(rgb[:, :2])], 1))
    rows = torch.cat([grey, colourise(rgb, logits, bins, args.temperature), rgb]).float().clamp(0, 1)
    torchvision.utils.save_image(rows, path, nrow=len(rgb))


# ALGO LOGIC: augmentation (official: a random crop and a flip), uint8 to the device
def colorization_augmentation(args):
    size = args.image_size
    if args.dataset in ("cifar10", "cifar100", "stl10"):  # whole small images: a padded random crop
        crop = [T.Resize(size), T.RandomCrop(size, padding=size // 8, padding_mode="reflect")]
    else:  # official: mirrored, random 176 crops of 256 px images, i.e. 0.6875 of the side (scaled to --image-size)
        crop = [T.Resize(round(size * 256 / 176)), T.RandomCrop(size)]
    return T.Compose([*crop, T.RandomHorizontalFlip(), T.PILToTensor()])


@torch.no_grad()
def estimate_prior(model, pretrain_set, args, device):
    """Sec. 2.2: the empirical distribution of the training images' ab (each output pixel's nearest bin), counted
    on every rank's share and summed, then smoothed and turned into weights (model.prior, model.weights)."""
    n = len(pretrain_set) if not args.prior_images else min(args.prior_images, len(pretrain_set))
    every = range(0, len(pretrain_set), max(1, len(pretrain_set) // n))[:n]  # evenly spaced, as --subset
    resize = colorization_augmentation(args).transforms[0]  # the training scale, centred: no randomness drawn
    images = common.Transformed(pretrain_set.base, T.Compose([resize, T.CenterCrop(args.image_size), T.PILToTensor()]))
    loader = common.eval_loader(torch.utils.data.Subset(images, every), args)  # this rank's share, each image once
    counts = torch.zeros(len(model.lookup.bins), device=device, dtype=torch.float64)
    coloured = torch.zeros((), device=device)
    for x, _, _ in loader:
        ab = rgb_to_lab(F.interpolate(x.to(device).float() / 255, size=model.out_size, mode="nearest"))[:, 1:]
        keep = (ab.abs() > 5).flatten(1).any(1)  # grey images carry no colour statistics (official mask)
        coloured += keep.sum()
        index, _ = soft_encode(ab[keep].permute(0, 2, 3, 1).reshape(-1, 2), model.lookup, 1, 1.0)  # the nearest
        counts += torch.bincount(index[:, 0], minlength=len(counts)).double()
    counts, coloured = common.all_reduce(counts), common.all_reduce(coloured)
    if coloured.item() == 0:
        common.fail(f"every image of --dataset {args.dataset} is grey (no |a| or |b| above 5), so there is no colour "
                    "to predict; colorization needs colour images (cifar10, cifar100, stl10, imagefolder)")
    model.prior, model.weights = (t.float() for t in rebalancing_weights(counts, model.lookup.bins.double(),
                                                                         args.sigma, args.rebalance))


def learning_rate(epoch, args):
    return args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.dataset == "fashion-mnist":
        common.fail("--dataset fashion-mnist is grey, so there is no colour to predict; colorization needs colour "
                    "images (cifar10, cifar100, stl10, imagefolder)")
    pretrain_set, *probe_sets = common.build_datasets(args, colorization_augmentation(args))

    # ALGO LOGIC: model and optimizer (official solver: Adam, beta 0.9 / 0.99, weight decay 1e-3)
    model = Colorizer(args.arch, args.image_size, ab_bins(neighbours=args.neighbours)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    features = LightnessFeatures(model.trunk, args.dataset).to(device)
    run = common.Run(args, device, probe_sets, model.trunk, features=features, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    if not run.resumed:  # a resumed run keeps the prior its checkpoint was trained with
        estimate_prior(model, pretrain_set, args, device)
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=learning_rate(0, args))

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        lr = learning_rate(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for step, (x, _, _) in enumerate(loader, start=sampler.start_step):
            rgb = x.to(device, non_blocking=True).float().div_(255)
            l_input = lightness(rgb)
            if device.type == "cuda":
                l_input = l_input.contiguous(memory_format=torch.channels_last)
            index, weight, pixel_weight = targets_and_weights(rgb, model, args)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = ddp_model(l_input)
            loss = rebalanced_cross_entropy(logits, index, weight, pixel_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = run.after_step(epoch, step, loss, lr)  # progress, checkpoints, monitor, divergence stop
            if common.rank() == 0 and (step + 1 == steps_per_epoch or done):  # at each epoch end, for the eye
                save_grid(rgb[:8], logits[:8].detach(), model.lookup.bins, args,
                          os.path.join(args.out, f"colourings_step{run.global_step}.png"))
            if done:
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks
    return run.final_evaluation()


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
