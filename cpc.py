# CPC: van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018
# (arXiv:1807.03748, Sec. 3.2 images); v2: Hénaff et al., "Data-Efficient Image Recognition with Contrastive
# Predictive Coding", ICML 2020 (arXiv:1905.09272; Sec. 4.1-4.2, Fig. 3, and its appendix's pseudo-code of the loss
# and the context network). No official code was released; defaults are the papers'.
#
#   python cpc.py --data /imagenet --batch-size 256                  # one 80 GB GPU (or CPU); Adam's lr is not scaled
#   python cpc.py --data /imagenet --grad-checkpoint                 # one 80 GB GPU at the paper's batch of 512
#   torchrun --nproc_per_node=8 cpc.py --data /imagenet              # 8 GPUs
#   torchrun --nproc_per_node=8 cpc.py --data /imagenet --v2         # ResNet-161, layer norm, four directions, patch aug.
#   python cpc.py --dataset fashion-mnist --arch resnet-tiny --subset 4000 --epochs 3 --batch-size 64 --lr 2e-3
#       # short runs (the test, benchmarks/run.py): v1's 2e-4 is for ~300K steps; 2e-3 learns in a few hundred
# Memory (bf16, activations kept for backward, counted on the CPU): v1 152 MiB an image (90 with --grad-checkpoint) and
# 11 GB of fp32 scores at batch 512 on one GPU; v2 1.5 GiB an image, 433 MiB with --grad-checkpoint (its default), so
# 64 images a GPU on 8 GPUs take about 27 GiB plus 5.3 GiB of weights and Adam.
#
# Each image becomes a 7x7 grid of half-overlapping patches; the trunk encodes every patch on its own (z); a
# row-causal context network summarises the rows above (c); W_k c at row i must pick out z at row i + k among all
# patches of the global batch (InfoNCE), for k from two rows below (v1 Fig. 4: the next row shares half its pixels).
# EVALUATION DIFFERS from the other files: the probe's feature is the trunk's output averaged over the patch grid of
# the whole image (the mean of z, as v2 and the common reimplementations; c would need the context network, which
# backbone.pth does not hold).
#
# Left out of v2, for want of numbers in the paper's text: its larger patches (Fig. 3 "LP"; this file keeps v1's grid)
# and the exact list and magnitudes of its patch augmentations (Sec. 4.2 "PA" names AutoAugment's primitives, elastic
# deformations and colour transforms; here: torchvision's RandAugment, two ops per patch, and an elastic warp), and
# its optimiser and schedule (v1's Adam is kept). docs/cpc.md maps every element of v2 to its section.
import argparse

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

import common

GRID = 7  # patches per side (Sec. 3.2)
DIRECTIONS = 4  # v2 Sec. 4.2: context from above (v1), below, the left and the right; each a rotation of the grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CPC pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # v1 Sec. 3.2: Adam at 2e-4, 32 GPUs x 16 images, ResNet-v2-101; no weight decay and no epoch count stated (100 is ours)
    common.add_common_args(p, "cpc", arch=None, epochs=100, batch_size=512, lr=2e-4, wd=0.0,
                           lr_help="Adam lr (v1 Sec. 3.2: 2e-4; not scaled with the batch)",
                           arch_help="torchvision ResNet name, resnet161 (v2's), or resnet-tiny for CPU runs (default: "
                                     "resnet101, with --v2 resnet161)")
    # ALGO LOGIC: CPC hyper-parameters; None = v1's value, or v2's with --v2
    p.add_argument("--v2", action="store_true", help="CPC v2: --arch resnet161 (v1: resnet101) and the defaults below switch to v2's (each flag names both)")
    p.add_argument("--stacks", type=int, default=3, choices=range(1, 5),
                   help="residual stages of the pre-activation trunk kept (v1, v2: 3, 'the third residual block')")
    p.add_argument("--norm", default=None, choices=["none", "batch", "layer"],
                   help="trunk normalisation (v1 Sec. 3.2: 'We did not use Batch-Norm' -> none; v2: layer; batch lets "
                        "patches share statistics, which v2 found the model exploits: for comparison only; default: none, with --v2 layer)")
    p.add_argument("--skip-rows", type=common.nonneg_int, default=None,
                   help="rows skipped below the context (v1 Fig. 4: 1, targets from z_{t+2}; v2 pseudo-code: 2; default: 1, with "
                        "--v2 2)")
    p.add_argument("--pred-steps", type=common.positive_int, default=None,
                   help="K: rows predicted after the skipped ones (v1: 5, 'up to five rows'; v2 pseudo-code: 1; default: 5, "
                        "with --v2 1)")
    p.add_argument("--directions", type=int, default=None, choices=[1, DIRECTIONS],
                   help="prediction directions (v1: 1, top-down; v2 Sec. 4.2: 4; default: 1, with --v2 4)")
    p.add_argument("--target-dim", type=common.nonneg_int, default=None,
                   help="targets: a 1x1 conv of z to this width (v2 pseudo-code: 64); 0: z itself (v1 Eq. 3; default: 0, "
                        "with --v2 64)")
    p.add_argument("--emb-scale", type=common.positive_float, default=0.1,
                   help="predictions W_k c scaled by this (v2 pseudo-code: 0.1; v1 states none: ours, so the first "
                        "scores are O(1))")
    p.add_argument("--patch-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="per-patch RandAugment (2 ops) and elastic warps (v2 Sec. 4.2 'PA'; v1: no; default: off, with --v2 on)")
    p.add_argument("--context-blocks", type=common.positive_int, default=5,
                   help="residual blocks of each context network (v2 pseudo-code: 5)")
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each trunk block in backward instead of keeping its activations (torch.utils."
                        "checkpoint; about a third more compute): v2's ResNet-161 needs 1.5 GiB an image without it, "
                        "so on by default with --v2 (v1: off, 152 MiB an image; default: off, with --v2 on)")
    args = common.parse(p, argv)
    v1 = dict(arch="resnet101", norm="none", skip_rows=1, pred_steps=5, directions=1, target_dim=0, patch_aug=False,
              grad_checkpoint=False)
    v2 = dict(arch="resnet161", norm="layer", skip_rows=2, pred_steps=1, directions=DIRECTIONS, target_dim=64,
              patch_aug=True, grad_checkpoint=True)
    for name, value in (v2 if args.v2 else v1).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.grad_checkpoint and args.norm == "batch":
        common.fail("--grad-checkpoint recomputes each block, so batch norm would update its running statistics twice; "
                    "use --norm none or layer, or --no-grad-checkpoint")
    if args.skip_rows + args.pred_steps > GRID - 1:
        common.fail(f"--skip-rows {args.skip_rows} and --pred-steps {args.pred_steps} reach past the {GRID}-row grid; "
                    f"use --skip-rows + --pred-steps <= {GRID - 1} (v1: 1 + 5)")
    return args


# ALGO LOGIC: the patch grid (Sec. 3.2: 64 px patches, stride 32, of a 256 crop of the image resized to 300)
def patch_geometry(image_size):
    """(crop, patch, stride): 256 / 64 / 32 at --image-size 224, scaled by image_size / 224 with an even patch so
    that the 7 x 7 grid at half overlap tiles the crop exactly (28 px: 32 / 8 / 4; 32 px: 40 / 10 / 5)."""
    def geometry(size):
        patch = 2 * round(32 * size / 224)
        return patch + (GRID - 1) * patch // 2, patch, patch // 2
    crop, patch, stride = geometry(image_size)
    if patch < 4:  # a 2 px stride or more, so neighbouring patches are not near-copies
        smallest = next(s for s in range(1, 1000) if geometry(s)[1] >= 4)
        common.fail(f"--image-size {image_size} gives {patch} px patches; CPC's 7x7 grid of half-overlapping "
                    f"patches needs --image-size >= {smallest}")
    return crop, patch, stride


def cut_patches(x, patch, stride):
    """(b, C, crop, crop) -> (b, 49, C, patch, patch), row-major, with two unfolds (no loops)."""
    b, C = x.shape[:2]
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (b, C, 7, 7, patch, patch)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, C, patch, patch)


class PatchGrid:
    """image -> its patches (49, C, p, p). v1 Sec. 3.2: a random crop of the resized image, a flip and greyscale for
    the whole image, then each patch jittered (a random 60/64 sub-crop, padded back). v2 keeps colour, and with
    --patch-aug gives each patch its own RandAugment and elastic warp (Sec. 4.2 'PA'), then colour dropping and flips."""

    def __init__(self, args):
        self.crop, self.patch, self.stride = patch_geometry(args.image_size)
        self.v2 = args.v2
        self.image = T.Compose([
            T.Resize(round(self.crop * 300 / 256)),
            T.RandomCrop(self.crop),
            T.RandomHorizontalFlip(),
            *([] if args.v2 else [T.Grayscale(num_output_channels=3)]),  # v1 Sec. 3.2: greyscale images
            T.PILToTensor(),  # uint8: the patch augmentations work on it, then ToTensor's scaling
        ])
        self.per_patch = T.Compose([
            T.RandAugment(num_ops=2),  # two of AutoAugment's primitives per patch, torchvision's magnitude 9 of 31
            # torchvision's default warp (alpha 50, sigma 5) at 64 px, scaled with the patch; p 0.2 is CPCV2-PyTorch's
            T.RandomApply([T.ElasticTransform(alpha=50.0 * self.patch / 64, sigma=5.0 * self.patch / 64)], p=0.2),
        ]) if args.patch_aug else None
        self.dataset, self.mean_std = args.dataset, {}

    def __call__(self, image):
        """-> uint8 patches (49, C, p, p) and each one's draws (49, 6): the jitter's source and destination corners
        (y, x, y, x), the channel it keeps (v2; else -1) and whether it is flipped (v2). to_device finishes them: the
        workers hand over a quarter of the floats' bytes."""
        patches = cut_patches(self.image(image)[None], self.patch, self.stride)[0]  # (49, C, p, p) uint8
        if self.per_patch is not None:
            patches = torch.stack([self.per_patch(p) for p in patches])
        n, C, p, _ = patches.shape
        corners = torch.randint(0, p - self.keep(p) + 1, (4, n)).T  # the jitter below
        kept, flip = (torch.randint(0, C, (n,)), (torch.rand(n) < 0.5).long()) if self.v2 else (torch.full((n,), -1),) * 2
        return patches, torch.cat([corners, kept[:, None], flip[:, None]], 1)

    @staticmethod
    def keep(p):  # the side of each patch's jitter crop: 60 of 64 (v1 Sec. 3.2)
        return min(p - 1, p * 60 // 64)

    def to_device(self, batch, device):
        """(uint8 (b, 49, C, p, p), draws (b, 49, 6)) from the loader -> normalised patches (b, 49, C, p, p) on the
        device, all b x 49 at once. Spatial jitter (v1 Sec. 3.2): a random keep x keep crop of each patch, padded back
        to p x p at a random place, so the content moves and overlapping neighbours no longer line up pixel for
        pixel; the padding is 0 (the mean). v2: colour dropping, each patch keeps one of its three channels (Sec. 4.2
        'RC'), and a flip."""
        patches, draws = (t.to(device, non_blocking=True).flatten(0, 1) for t in batch)
        if device not in self.mean_std:  # copied to the device once, not every step
            self.mean_std[device] = [torch.tensor(v, device=device)[:, None, None] for v in common.MEAN_STD[self.dataset]]
        x = patches.float().div_(255).sub_(self.mean_std[device][0]).div_(self.mean_std[device][1])
        n, C, p, _ = x.shape
        keep = self.keep(p)
        src_y, src_x, dst_y, dst_x = draws[:, :4].T[:, :, None]  # (n, 1) each
        rows = torch.arange(p, device=device)[None]  # output pixel r shows input pixel r - dst + src, if inside the crop
        in_y, in_x = rows - dst_y + src_y, rows - dst_x + src_x  # (n, p) each
        inside = ((rows >= dst_y) & (rows < dst_y + keep))[:, :, None] & ((rows >= dst_x) & (rows < dst_x + keep))[:, None, :]
        moved = x[torch.arange(n, device=device)[:, None, None], :, in_y.clamp(0, p - 1)[:, :, None],
                  in_x.clamp(0, p - 1)[:, None, :]]  # (n, p, p, C)
        x = moved.permute(0, 3, 1, 2) * inside[:, None]  # (n, C, p, p), the padding 0
        if self.v2:
            x = x * F.one_hot(draws[:, 4], C).to(x.dtype)[:, :, None, None]
            x = torch.where(draws[:, 5, None, None, None] > 0, x.flip(-1), x)
        # one layout whatever the ops above left (so the same bits); channels_last per patch on CUDA, which the
        # trunk's (49b, C, p, p) view keeps
        x = x.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
        return x.unflatten(0, (len(batch[0]), -1))


# ALGO LOGIC: the trunk. v1 Sec. 3.2: "ResNet-v2-101 ... the outputs from the third residual block, spatially mean-pooled
# to a single 1024-d vector per 64x64 patch", no batch norm: pre-activation blocks (He et al. 2016, "Identity Mappings
# in Deep Residual Networks"), cut after --stacks, with an initialisation that needs no normalisation
def norm_layer(kind):
    """torchvision's ResNet takes norm_layer(channels): v1's no normalisation, BN, or per-patch layer norm."""
    return {"none": lambda c: nn.Identity(), "batch": nn.BatchNorm2d, "layer": lambda c: nn.GroupNorm(1, c)}[kind]


class PreAct(nn.Module):
    """A torchvision block's convolutions, run pre-activation: x + F(x), F = (norm, ReLU, conv) for each conv, the
    projection shortcut on the pre-activated input, nothing after the sum. Its convs keep torchvision's names and
    shapes (conv1.., downsample.0); its norms sit before each conv, on that conv's input channels."""

    def __init__(self, block, norm):
        super().__init__()
        convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        for i, conv in enumerate(convs, 1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", norm(conv.in_channels))
        self.depth = len(convs)
        self.downsample = nn.Sequential(block.downsample[0]) if block.downsample is not None else None  # no norm after

    @property  # looked up by name each time: SyncBatchNorm's conversion replaces the bn modules
    def convs(self):
        return [getattr(self, f"conv{i}") for i in range(1, self.depth + 1)]

    @property
    def norms(self):
        return [getattr(self, f"bn{i}") for i in range(1, self.depth + 1)]

    checkpointed = False  # --grad-checkpoint

    def forward(self, x):  # checkpointed: backward keeps only the block's input and recomputes the rest
        if self.checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.residual, x, use_reentrant=False)
        return self.residual(x)

    def residual(self, x):
        h = F.relu(self.norms[0](x))
        shortcut = x if self.downsample is None else self.downsample(h)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(h if i == 0 else F.relu(norm(h)))
        return shortcut + h


def build_trunk(arch, image_size, norm, stacks):
    """torchvision's ResNet for --arch (its stem, stage layout and names) with pre-activation blocks, cut after
    `stacks` stages (the rest Identity), mean-pooled -> (trunk, width). No normalisation: Fixup's rules 1-2
    (Zhang, Dauphin, Ma, ICLR 2019, Sec. 3): He (fan-in) init, the convs inside each of the L residual branches of
    m layers scaled by L^(-1/(2m-2)), the last one zero, so every block starts as the identity (a stage's first, its
    projection shortcut) and the activations keep the scale of the stem's; Fixup's scalar biases and multipliers (its
    rule 3) are left out."""
    net, _ = common.build_backbone("resnet101" if arch == "resnet161" else arch, image_size, norm_layer=norm_layer(norm))
    if arch == "resnet161":  # v2 Sec. 4.1 'MC': ResNet-101's third stack at 46 blocks, 4096 wide, 512-d bottlenecks
        net.inplanes, net.base_width = 512, 32  # torchvision's bottleneck width: planes x base_width / 64
        net.layer3 = net._make_layer(torchvision.models.resnet.Bottleneck, 1024, 46, stride=2)
        net.base_width = 64
        net.layer4 = net._make_layer(torchvision.models.resnet.Bottleneck, 512, 3, stride=2)  # on 4096 channels
    for i in range(1, 5):
        setattr(net, f"layer{i}", nn.Sequential(*[PreAct(b, norm_layer(norm)) for b in getattr(net, f"layer{i}")])
                if i <= stacks else nn.Identity())
    blocks = [m for m in net.modules() if isinstance(m, PreAct)]
    for m in net.modules():
        if isinstance(m, nn.Conv2d):  # forward-preserving He init (torchvision's fan-out shrinks a no-norm trunk's scale)
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    if norm == "none":
        for block in blocks:
            for conv in block.convs[:-1]:
                conv.weight.data.mul_(len(blocks) ** (-1 / (2 * len(block.convs) - 2)))
            nn.init.zeros_(block.convs[-1].weight)
    return net, blocks[-1].convs[-1].out_channels


# ALGO LOGIC: model. z = the mean-pooled trunk per patch; per direction, c = a causal context network and W_k per step
class CausalBlock(nn.Module):
    """A residual block whose output row i sees input rows <= i only (v2's pseudo-code of the context network): 1x1,
    a 1x3 within the row, then one row of zeros padded on top and a 2x1 'valid' convolution over rows i-1 and i, 1x1."""

    def __init__(self, dim, hidden=256):
        super().__init__()
        self.reduce, self.within_row = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.from_above, self.expand = nn.Conv2d(hidden, hidden, (2, 1)), nn.Conv2d(hidden, dim, 1)

    def forward(self, c):
        h = self.within_row(F.relu(self.reduce(c)))
        h = self.from_above(F.pad(h, (0, 0, 1, 0)))  # pad (left, right, top, bottom): one row on top
        return c + self.expand(F.relu(h))


def turn(x, d):
    """Rotate a (b, D, H, W) grid by d quarter turns so that direction d reads top-down: 0 from above, 1 from the
    right, 2 from below, 3 from the left (turn(x, -d) turns back)."""
    return torch.rot90(x, d, dims=(2, 3))


class CPC(nn.Module):
    def __init__(self, arch, image_size, norm, stacks, steps, context_blocks, directions=1, target_dim=0, emb_scale=0.1):
        super().__init__()
        self.trunk, dim = build_trunk(arch, image_size, norm, stacks)
        self.steps, self.emb_scale = list(steps), emb_scale  # only the steps used have a W_k (DDP needs each one used)
        # v2 pseudo-code: targets are a 1x1 conv of z (64 wide) and the predictions map c to that width; v1: z itself
        self.target = nn.Conv2d(dim, target_dim, 1) if target_dim else nn.Identity()
        self.context = nn.ModuleList(nn.Sequential(*[CausalBlock(dim) for _ in range(context_blocks)], nn.ReLU())
                                     for _ in range(directions))  # one context network per direction
        self.W = nn.ModuleList(nn.ModuleList(nn.Conv2d(dim, target_dim or dim, 1, bias=bool(target_dim))
                                             for _ in self.steps) for _ in range(directions))
        # W_k per direction and step: linear (v1 Eq. 3, z'^T W_k c); v2's pseudo-code Conv2D, with its bias

    def encode(self, patches):
        """(b, 49, C, p, p) -> z (b, D, 7, 7): every patch on its own through the trunk, as one batch of 49b."""
        b = patches.shape[0]
        z = self.trunk(patches.flatten(0, 1))  # (49b, D), mean-pooled by the trunk
        return z.reshape(b, GRID, GRID, -1).permute(0, 3, 1, 2)

    def forward(self, patches):
        return self.predict(self.encode(patches))

    def predict(self, z):
        """z -> per direction d, in d's frame (turn): the targets (b, D', 7, 7) and, per step k, the predictions
        emb_scale W_k c of rows k .. 6 made from rows 0 .. 6-k."""
        targets, predictions = self.target(z), []
        for d, (context, W) in enumerate(zip(self.context, self.W)):
            c = context(turn(z, d))  # row i has seen rows <= i only, of the grid turned for direction d
            predictions.append([self.emb_scale * W_k(c[:, :, :GRID - k]) for k, W_k in zip(self.steps, W)])
        return [turn(targets, d) for d in range(len(self.W))], predictions


def info_nce(z, predictions, steps):
    """InfoNCE (v1 Eq. 4) for every image, position (i, j) and step k: the score of a candidate z' is
    z'.(W_k c_ij); the positive is z at (i+k, j), the negatives every other z of the GLOBAL batch (other positions
    and other images, gathered with gradient). Cross-entropy in fp32, averaged over positions, then over steps; the
    scores' matmul runs in the caller's autocast dtype (bf16 on CUDA)."""
    b, D, H, Wd = z.shape
    z_all = common.gather_with_grad(z.permute(0, 2, 3, 1).reshape(b * H * Wd, D))  # (N*49, D) candidates
    image = common.rank() * b + torch.arange(b, device=z.device)[:, None, None]  # in the global batch
    losses = []
    for k, prediction in zip(steps, predictions):  # prediction: (b, D, H-k, W)
        logits = prediction.permute(0, 2, 3, 1).reshape(-1, D) @ z_all.T  # (b*(H-k)*W, N*49)
        # where z at (i + k, j) sits among the candidates, built on the device (no host copy per step)
        target = (image * H + torch.arange(k, H, device=z.device)[:, None]) * Wd + torch.arange(Wd, device=z.device)
        losses.append(F.cross_entropy(logits.float(), target.flatten()))
    return torch.stack(losses).mean()


def cpc_loss(targets, predictions, steps):
    """InfoNCE averaged over the directions (v2: each direction one more prediction task)."""
    return torch.stack([info_nce(t, p, steps) for t, p in zip(targets, predictions)]).mean()


class GridMean(nn.Module):
    """The probe's feature: the trunk's z averaged over the patch grid of the whole image (resized to the crop),
    in greyscale for v1 as in training."""

    def __init__(self, model, args):
        super().__init__()
        self.model, (self.crop, self.patch, self.stride) = model, patch_geometry(args.image_size)
        self.greyscale = not args.v2
        self.mean_std = common.MEAN_STD[args.dataset]

    def forward(self, x):
        if self.greyscale:  # torchvision's Grayscale luma on the unnormalised image, then normalised again
            mean, std, luma_weights = (x.new_tensor(v)[:, None, None] for v in (*self.mean_std, [0.299, 0.587, 0.114]))
            luma = ((x * std + mean) * luma_weights).sum(1, keepdim=True)
            x = (luma - mean) / std
        x = F.interpolate(x, size=self.crop, mode="bilinear", align_corners=False) if x.shape[-1] != self.crop else x
        return self.model.encode(cut_patches(x, self.patch, self.stride)).mean((2, 3))


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    grid = PatchGrid(args)
    pretrain_set, *probe_sets = common.build_datasets(args, grid)

    # ALGO LOGIC: model and optimizer
    steps = range(args.skip_rows + 1, args.skip_rows + args.pred_steps + 1)  # k: rows below the context
    model = CPC(args.arch, args.image_size, args.norm, args.stacks, steps, args.context_blocks, args.directions,
                args.target_dim, args.emb_scale).to(device)
    for block in model.trunk.modules():
        if isinstance(block, PreAct):
            block.checkpointed = args.grad_checkpoint
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd)  # v1 Sec. 3.2

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only; backbone.pth records build_trunk's arguments (hubconf.py)
    run = common.Run(args, device, probe_sets, model.trunk, features=GridMean(model, args), model=model,
                     optimizer=optimizer, trunk_recipe=dict(norm=args.norm, stacks=args.stacks))
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:
        if args.norm == "batch" and device.type == "cuda":  # one set of statistics over all patches of the batch
            ddp_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=args.lr)

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        for group in optimizer.param_groups:  # constant (v1); set here, not from a checkpoint
            group["lr"] = args.lr
        model.train()
        for step, (batch, _, _) in enumerate(loader, start=sampler.start_step):
            patches = grid.to_device(batch, device)  # (b, 49, C, p, p), channels_last per patch on CUDA
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                targets, predictions = ddp_model(patches)
                loss = cpc_loss(targets, predictions, model.steps)  # scores in bf16, their cross-entropy in fp32
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if run.after_step(epoch, step, loss, args.lr):  # progress, checkpoints, monitor, divergence stop
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks
    return run.final_evaluation()


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
