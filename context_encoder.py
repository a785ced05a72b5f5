# Context Encoders: Pathak, Krähenbühl, Donahue, Darrell, Efros, "Context Encoders: Feature Learning by
# Inpainting", CVPR 2016 (arXiv:1604.07379). Defaults follow pathak22/context-encoder (train.lua, train_random.lua).
#
#   python context_encoder.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 context_encoder.py --data /imagenet              # 8 GPUs
#   python context_encoder.py --data /imagenet --mask center --adv-weight 0      # centre hole, L2 only
#
# The encoder is the ResNet trunk on the masked image (its last feature map, before pooling); the paper's
# channel-wise fully-connected bottleneck (Sec. 3.1; the released train.lua uses a plain 4x4 convolution
# instead) and up-convolutions reconstruct the hole. The probe reads the trunk, pooled, on
# the whole unmasked image, as for every method. Images live in the normalised space of common.normalize, so
# the dataset mean is 0 there: the hole is filled with 0, and the decoder's output is linear (official: tanh
# on [-1, 1] images).
# Short runs (benchmarks/run.py): these defaults at train.lua's batch 64, random-region masks.
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
    p = argparse.ArgumentParser(description="Context Encoder pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official train.lua: niter 25, batch 64, Adam 2e-4, no weight decay
    common.add_common_args(p, "context_encoder", arch="resnet50", epochs=25, batch_size=64, lr=None, wd=0.0,
                           lr_help="Adam lr, not scaled with the batch: of the discriminator with the adversarial term "
                                   "(official 2e-4); with --adv-weight 0 of the encoder-decoder (paper Sec. 5.2: 1e-3 for "
                                   "the centre mask, 1e-4 for random ones); default: that recipe's value")
    # ALGO LOGIC: context encoder hyper-parameters (official train.lua)
    p.add_argument("--mask", default="random-region", choices=["center", "random-block", "random-region"],
                   help="hole shape (paper Sec. 3.3: random-region for feature learning)")
    p.add_argument("--rec-weight", type=common.nonneg_float, default=0.999, help="lambda_rec of the L2 term (official wtl2)")
    p.add_argument("--adv-weight", type=common.nonneg_float, default=0.001, help="lambda_adv of the adversarial term (0: L2 only)")
    p.add_argument("--overlap-weight", type=common.nonneg_float, default=10.0, help="L2 weight on the centre hole's overlap border")
    p.add_argument("--beta1", type=common.unit_float, default=0.5, help="Adam beta1 (official 0.5)")
    p.add_argument("--gen-lr-ratio", type=common.positive_float, default=10.0, help="encoder-decoder lr / --lr with the adversarial term (official 10)")
    p.add_argument("--dropout", type=common.unit_float, default=None,
                   help="dropout on the channel-wise FC layer (paper Sec. 5.2: 0.5 with --adv-weight 0; official "
                        "train.lua, with the adversarial term: none; default: 0.5 with --adv-weight 0, else 0)")
    args = common.parse(p, argv)
    adversarial = args.adv_weight > 0
    if args.lr is None:
        args.lr = 2e-4 if adversarial else (1e-3 if args.mask == "center" else 1e-4)
    if args.dropout is None:
        args.dropout = 0.0 if adversarial else 0.5
    if args.dropout == 1:
        common.fail("--dropout 1 drops every feature of the bottleneck; use a rate below 1 (paper: 0.5)")
    return args


# ALGO LOGIC: augmentation (a square crop and a flip) and the masks, drawn per sample in the data workers
def context_augmentation(args):
    size = args.image_size
    if args.dataset in ("cifar10", "cifar100", "fashion-mnist"):  # small whole images: keep all of each
        crop = [T.Resize(size), T.CenterCrop(size)]
    else:  # official donkey_folder.lua: short side to 350, a random 128 crop (scaled with --image-size)
        crop = [T.Resize(round(size * 350 / 128)), T.RandomCrop(size)]
    return T.Compose([
        *crop,
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        common.normalize(args.dataset),
    ])


def overlap_width(size):
    return max(1, round(4 * size / 128))  # official overlapPred 4 px at 128, scaled with the image


def center_mask(size):
    """The filled hole: the central square of half the side less an overlap border, which stays visible; the
    decoder predicts the whole central square, its L2 weighted x10 on that border (train.lua; loss_weights)."""
    half, o = size // 2, overlap_width(size)
    lo = size // 4
    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[lo + o:lo + half - o, lo + o:lo + half - o] = True
    return hole


def random_block_mask(size, coverage=0.25):
    """Blocks of 1/8 to 1/4 of the side at random places, possibly overlapping, until they cover 1/4 (Sec. 3.3)."""
    hole = torch.zeros(size, size, dtype=torch.bool)
    while hole.float().mean() < coverage:
        h, w = torch.randint(max(1, size // 8), max(2, size // 4 + 1), (2,)).tolist()
        y, x = torch.randint(0, size - h + 1, ()).item(), torch.randint(0, size - w + 1, ()).item()
        hole[y:y + h, x:x + w] = True
    return hole


def random_region_mask(size, density=0.25, cells=7.68, tries=100):
    """Random blobs (train_random.lua): uniform noise on a coarse grid (0.06 cells per px over its 128 px crops,
    7.68 cells a side at any size), upsampled bicubically, thresholded at the density, kept when it covers
    20-30% of the image (the closest of `tries` otherwise). One per image here; official: one per batch."""
    grid = math.ceil(cells) + 2
    upsampled = round(grid * size / cells)
    best = None
    for _ in range(tries):
        noise = F.interpolate(torch.rand(1, 1, grid, grid), size=upsampled, mode="bicubic", align_corners=False)[0, 0]
        y, x = torch.randint(0, upsampled - size + 1, (2,)).tolist()
        hole = noise[y:y + size, x:x + size] < density
        area = hole.float().mean().item()
        if 0.2 < area < 0.3:
            return hole
        if best is None or abs(area - 0.25) < abs(best.float().mean().item() - 0.25):
            best = hole
    return best


class MaskedImage:
    """image -> (normalised image (C, S, S), hole (S, S) bool). The hole is drawn here, seeded per sample."""

    def __init__(self, args):
        self.augment, self.size, self.kind = context_augmentation(args), args.image_size, args.mask

    def __call__(self, image):
        draw = {"center": center_mask, "random-block": random_block_mask, "random-region": random_region_mask}
        return self.augment(image), draw[self.kind](self.size)


def mask_image(x, hole):
    """Fill the hole with the dataset mean: 0 in the normalised space (x: (b, C, S, S), hole: (b, S, S))."""
    return x.masked_fill(hole[:, None], 0.0)


def loss_weights(hole, kind, overlap_weight):
    """Per-pixel L2 weights on the predicted region: for the centre, the central square with x`overlap_weight`
    on the overlap border around the hole (train.lua); for random masks the hole only, the paper's masked L2
    (Eq. 1; train_random.lua's recipe weighs the whole image alike)."""
    if kind != "center":
        return hole.float()  # (b, S, S)
    size = hole.shape[-1]
    lo, half = size // 4, size // 2
    weight = torch.full_like(hole[:, lo:lo + half, lo:lo + half], overlap_weight, dtype=torch.float)
    return torch.where(hole[:, lo:lo + half, lo:lo + half], 1.0, weight)  # (b, S/2, S/2)


def target_region(x, kind):
    """What the decoder predicts: the central square (centre mask) or the whole image (random masks)."""
    if kind != "center":
        return x
    lo, half = x.shape[-1] // 4, x.shape[-1] // 2
    return x[..., lo:lo + half, lo:lo + half]


# ALGO LOGIC: model. Encoder (the trunk), channel-wise FC bottleneck, decoder; and the discriminator
class ChannelWiseFC(nn.Module):
    """Sec. 3.1: a fully-connected layer per feature map (no mixing across channels: C (hw x hw) weights instead
    of (Chw)^2), then a stride-1 1x1 convolution to spread information across channels."""

    def __init__(self, channels, side):
        super().__init__()
        n = side * side
        self.weight = nn.Parameter(torch.randn(channels, n, n) / math.sqrt(n))
        self.bias = nn.Parameter(torch.zeros(channels, n))
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, f, keep=None):  # f (b, C, h, w); keep (b, C, h*w): dropout's scaled mask, or None
        b, c, h, w = f.shape
        f = F.relu(torch.einsum("bcp,cpq->bcq", f.flatten(2), self.weight.to(f.dtype)) + self.bias.to(f.dtype))
        f = f if keep is None else f * keep.to(f.dtype)  # 0 and 2 (p 0.5) are exact in bf16
        return self.mix(f.reshape(b, c, h, w))


def dropout_mask(b, shape, p, generator):
    """Dropout's mask for the channel-wise FC (paper Sec. 5.2), from the step's own generator: drawn for the global
    batch, this rank's rows kept, so --resume repeats it exactly; None when p is 0."""
    if p == 0:
        return None
    rank, world_size = common.rank(), common.world()
    u = torch.rand(world_size * b, *shape, generator=generator, device=generator.device)[rank * b:(rank + 1) * b]
    return (u >= p) / (1 - p)


def up_block(cin, cout):  # official decoder: 4x4 stride-2 up-convolution, BN, ReLU
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class Generator(nn.Module):
    """masked image (b, 3, S, S) -> the predicted region (b, 3, T, T), T = S/2 (centre) or S (random masks)."""

    def __init__(self, arch, image_size, kind):
        super().__init__()
        self.trunk, channels = common.build_backbone(arch, image_size)
        self.trunk.eval()  # measure the feature map's side without touching the BN statistics
        with torch.no_grad():
            side = self.feature_map(torch.zeros(1, 3, image_size, image_size)).shape[-1]
        self.trunk.train()
        self.bottleneck = ChannelWiseFC(channels, side)
        self.out_size = image_size // 2 if kind == "center" else image_size
        cin, width, layers = channels, min(512, channels), []
        for _ in range(max(1, math.ceil(math.log2(self.out_size / side)))):  # double until the target size
            layers.append(up_block(cin, width))
            cin, width = width, max(32, width // 2)
        self.decoder = nn.Sequential(*layers, nn.Conv2d(cin, 3, 3, padding=1))

    def feature_map(self, x):
        """The trunk's last feature map, before its global pooling (torchvision ResNet layout)."""
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward(self, masked, keep=None):
        out = self.decoder(self.bottleneck(self.feature_map(masked), keep))
        if out.shape[-1] != self.out_size:  # e.g. 16 -> 14 at 28 px: the grid does not halve evenly
            out = F.interpolate(out, size=self.out_size, mode="bilinear", align_corners=False)
        return out


class Discriminator(nn.Module):
    """Real or inpainted region: 4x4 stride-2 convolutions, LeakyReLU 0.2, BN after the first (official netD),
    down to 4 px or less, then one logit."""

    def __init__(self, size):
        super().__init__()
        layers, cin, cout = [], 3, 64
        while size > 4:
            layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False)] + ([nn.BatchNorm2d(cout)] if layers else [])
            layers.append(nn.LeakyReLU(0.2, True))
            cin, cout, size = cout, min(512, cout * 2), size // 2
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * size * size, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


class ContextEncoder(nn.Module):
    """Both networks in one module, so the checkpoint holds them together."""

    def __init__(self, arch, image_size, kind):
        super().__init__()
        self.generator = Generator(arch, image_size, kind)
        self.discriminator = Discriminator(self.generator.out_size)
        for m in [*self.generator.decoder.modules(), *self.discriminator.modules()]:  # official (DCGAN) init
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def trunk(self):  # the ResNet the probes read and backbone.pth holds
        return self.generator.trunk


def reconstruction_loss(prediction, target, weight):
    """Weighted squared error averaged over all elements (official MSECriterion, its gradient scaled by the
    weight map)."""
    return (weight[:, None] * (prediction.float() - target.float()) ** 2).mean()


def inpainted(prediction, x, hole, kind):
    """The region the discriminator judges: the predicted centre square as it is (official), or for random
    masks the image with the prediction in its hole only (the rest is context, never trained by L2)."""
    return prediction if kind == "center" else torch.where(hole[:, None], prediction, x.to(prediction.dtype))


def save_grid(masked, prediction, original, hole, args, path):
    """PNG with three rows: masked input, inpainted image (the prediction pasted into the hole), original."""
    filled = original.clone()
    if args.mask == "center":
        lo, half = original.shape[-1] // 4, original.shape[-1] // 2
        filled[..., lo:lo + half, lo:lo + half] = prediction
    else:
        filled = torch.where(hole[:, None], prediction.to(original.dtype), original)
    mean, std = (torch.tensor(v, device=original.device)[:, None, None] for v in common.MEAN_STD[args.dataset])
    rows = (torch.cat([masked, filled, original]).float() * std + mean).clamp(0, 1)  # back to [0, 1] pixels
    torchvision.utils.save_image(rows, path, nrow=len(original))


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.image_size < 8:  # the centre hole is half the side less a border of at least 1 px on each side
        common.fail(f"--image-size {args.image_size} leaves no room for a hole inside its context; use 8 or more")
    pretrain_set, *probe_sets = common.build_datasets(args, MaskedImage(args))

    # ALGO LOGIC: model and optimizer
    model = ContextEncoder(args.arch, args.image_size, args.mask).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # official train.lua: Adam, beta1 0.5, constant lr; with the joint loss the encoder-decoder's lr is 10x the
    # discriminator's (paper Sec. 5.1), with L2 alone it is --lr
    lr_g = args.lr * (args.gen_lr_ratio if args.adv_weight > 0 and args.rec_weight > 0 else 1.0)
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr_g, betas=(args.beta1, 0.999), weight_decay=args.wd)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=args.lr, betas=(args.beta1, 0.999),
                             weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer_g=opt_g, optimizer_d=opt_d)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    generator, discriminator = model.generator, model.discriminator
    if common.world() > 1:  # both networks wrapped: each one's gradients are averaged, so the replicas stay equal
        ids = [device] if device.type == "cuda" else None
        generator = nn.parallel.DistributedDataParallel(model.generator, device_ids=ids)
        discriminator = nn.parallel.DistributedDataParallel(model.discriminator, device_ids=ids)
    # the generator's step needs D's input gradient only: unwrapped and with D's weights frozen it computes no gradient
    # for them and all-reduces none (the official code likewise back-propagates through D without D's update)
    judge = model.discriminator
    if args.compile:
        generator, discriminator, judge = torch.compile(generator), torch.compile(discriminator), torch.compile(judge)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=lr_g)
    adversarial = args.adv_weight > 0

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        for opt, lr in ((opt_g, lr_g), (opt_d, args.lr)):  # constant (official); set here, not from a checkpoint
            for group in opt.param_groups:
                group["lr"] = lr
        model.train()
        for step, ((x, hole), _, _) in enumerate(loader, start=sampler.start_step):
            x, hole = x.to(device, non_blocking=True), hole.to(device, non_blocking=True)
            masked = mask_image(x, hole)
            target, weight = target_region(x, args.mask), loss_weights(hole, args.mask, args.overlap_weight)
            if device.type == "cuda":
                masked = masked.contiguous(memory_format=torch.channels_last)
            keep = dropout_mask(len(x), model.generator.bottleneck.bias.shape, args.dropout,
                                common.step_generator(args.seed, run.global_step, device))
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                prediction = generator(masked, keep)
            fake = inpainted(prediction, x, hole, args.mask)
            if adversarial:  # discriminator step first, real and inpainted in separate batches (official)
                with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    real_logits = discriminator(target)
                loss_d_real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits.float()))
                opt_d.zero_grad(set_to_none=True)
                loss_d_real.backward()
                with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    fake_logits = discriminator(fake.detach())
                loss_d_fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits.float()))
                loss_d_fake.backward()
                opt_d.step()
            loss_rec = reconstruction_loss(prediction, target, weight)
            loss = args.rec_weight * loss_rec
            if adversarial:  # the encoder-decoder tries to make D call its output real
                model.discriminator.requires_grad_(False)
                with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    fooled = judge(fake)
                model.discriminator.requires_grad_(True)
                loss = loss + args.adv_weight * F.binary_cross_entropy_with_logits(
                    fooled.float(), torch.ones_like(fooled.float()))
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            done = run.after_step(epoch, step, loss, lr_g)  # progress, checkpoints, monitor, divergence stop
            if common.rank() == 0 and (step + 1 == steps_per_epoch or done):
                # at each epoch end (each monitor) and the last step, what it learnt, for the eye
                save_grid(masked[:8], prediction[:8].detach(), x[:8], hole[:8], args,
                          os.path.join(args.out, f"inpainting_step{run.global_step}.png"))
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
