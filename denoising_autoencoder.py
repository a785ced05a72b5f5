# Denoising autoencoders: Vincent, Larochelle, Bengio, Manzagol, "Extracting and Composing Robust Features with
# Denoising Autoencoders", ICML 2008; Vincent, Larochelle, Lajoie, Bengio, Manzagol, "Stacked Denoising Autoencoders:
# Learning Useful Representations in a Deep Network with a Local Denoising Criterion", JMLR 11 (2010).
# Corruptions as the JMLR paper's three (masking, additive Gaussian, salt-and-pepper) with its emphasis weights; the
# Theano tutorial (lisa-lab/DeepLearningTutorials, dA.py, SdA.py) for what the papers leave open.
#
#   python denoising_autoencoder.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 denoising_autoencoder.py --data /imagenet              # 8 GPUs
#   python denoising_autoencoder.py --data /imagenet --stacked                         # greedy, stage by stage
#
# The papers' encoder is one sigmoid layer of an MLP on raw pixels; here it is the ResNet trunk (its last feature map)
# and the decoder a light stack of up-convolutions back to the image, linear at the end (the JMLR affine decoder for
# real-valued inputs, squared error; --loss cross-entropy reads it as the logits of a sigmoid decoder). Corruption is
# applied to pixels in [0, 1], where "set to 0" and "set to the minimum or maximum" mean what they mean in the papers;
# the encoder then sees the corrupted image normalised as every method's input. The probe reads the trunk, pooled, on
# clean images.
# Deliberate deviations, for a conv trunk: Adam (lr 1e-3) instead of the papers' plain SGD tuned per MLP layer, and
# for ImageFolder a random crop and flip to a fixed size (the papers use no augmentation; small datasets get none).
# Squared error by default, where the papers use, for inputs in [0, 1], the reconstruction cross-entropy (ICML 2008
# Sec. 2.2, JMLR Sec. 4.2; --loss cross-entropy): squared error is the one loss that also fits --stacked's upper layers.
# --stacked corrupts their BN-ReLU maps with the pixel-unit --sigma; the papers' upper layers take sigmoid codes, in
# [0, 1] as pixels are, so there one noise level means the same at every layer.
# Short runs (benchmarks/run.py): these defaults at --batch-size 128.
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Denoising autoencoder pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # a choice for the conv trunk (the papers tune SGD per layer): Adam 1e-3, not scaled with the batch, no decay
    common.add_common_args(p, "denoising_autoencoder", arch="resnet50", epochs=30, batch_size=256, lr=1e-3, wd=0.0,
                           lr_help="Adam lr, not scaled with the batch")
    # ALGO LOGIC: denoising hyper-parameters (JMLR: "Types of Corruption Considered", "Putting an Emphasis on
    # Corrupted Dimensions")
    p.add_argument("--noise", default="masking", choices=["masking", "gaussian", "salt-pepper"],
                   help="corruption q_D (ICML 2008: masking)")
    p.add_argument("--nu", type=common.unit_float, default=0.25,
                   help="fraction of the components masked or salted (the middle of the papers' 0.1 / 0.25 / 0.4)")
    p.add_argument("--sigma", type=common.nonneg_float, default=0.15,
                   help="std of the additive Gaussian, in [0, 1] pixel units (JMLR searched 0.05 to 0.5)")
    p.add_argument("--alpha", type=common.nonneg_float, default=1.0, help="emphasis: weight on corrupted components")
    p.add_argument("--beta", type=common.nonneg_float, default=1.0,
                   help="emphasis: weight on the others (1: plain DAE; JMLR double emphasis 0.5, full emphasis 0)")
    p.add_argument("--loss", default="squared", choices=["squared", "cross-entropy"],
                   help="reconstruction loss (the papers' for inputs in [0, 1]: cross-entropy, a sigmoid decoder)")
    p.add_argument("--stacked", action="store_true",
                   help="greedy layer-wise (JMLR's stacking): the epochs split over the trunk's stages, each a DAE on "
                        "the frozen, clean output of those below")
    args = common.parse(p, argv)
    if args.alpha == 0 and args.beta == 0:
        common.fail("--alpha 0 --beta 0 weighs every component by 0, so nothing is learnt; keep one of them above 0")
    if args.noise == "gaussian" and (args.alpha, args.beta) != (1, 1):
        common.fail("--noise gaussian changes every component, so --alpha / --beta have nothing to tell apart; "
                    "use them with masking or salt-pepper")
    if args.stacked and args.loss == "cross-entropy":
        common.fail("--stacked's upper layers reconstruct ReLU feature maps, not values in [0, 1], which cross-entropy "
                    "needs; use --loss squared with --stacked")
    if args.stacked and args.noise == "salt-pepper":
        common.fail("--stacked corrupts feature maps above the stem, which have no 0 / 1 ends for salt-and-pepper; "
                    "use --noise masking or gaussian")
    if args.stacked and args.epochs < len(STAGES):
        common.fail(f"--stacked splits --epochs over the trunk's {len(STAGES)} stages; use --epochs {len(STAGES)} or more")
    return args


# ALGO LOGIC: augmentation. None for the fixed-size datasets (as the papers); a crop and flip for ImageFolder
def dae_augmentation(args):
    size = args.image_size
    if args.dataset != "imagefolder":  # CIFAR, STL-10, Fashion-MNIST: the whole image
        crop = [T.Resize(size), T.CenterCrop(size)]
    else:  # photos of any size: a fixed-size crop (deviation: the papers' inputs have one size)
        crop = [T.Resize(round(size * 256 / 224)), T.RandomCrop(size), T.RandomHorizontalFlip()]
    return T.Compose([*crop, T.PILToTensor()])  # uint8: a quarter of the floats' bytes from the workers


# ALGO LOGIC: the corruption process q_D(x~ | x) (JMLR's three types), drawn from the step generator for the global batch
def corrupt(x, noise, nu, sigma, generator):
    """x (b, ...) clean values -> (x~, corrupted: bool mask of the components q_D changed, None for Gaussian noise).
    Masking: exactly round(nu d) of the d components of each sample, chosen at random, set to 0 (ICML 2008's fixed
    number; the Theano tutorial draws each one alone). Salt-and-pepper: the same number set to the minimum (0) or the
    maximum (1) by a fair coin. Gaussian: x + N(0, sigma^2) on every component. Drawn for all ranks' samples and this
    rank's rows kept, so two ranks corrupt as one process and --resume repeats it. sigma is in the units of x: [0, 1]
    pixels, and the same sigma on --stacked's BN-ReLU maps (deviation: the papers' upper inputs are sigmoid codes)."""
    rank, world_size, b = common.rank(), common.world(), len(x)
    rows = slice(rank * b, (rank + 1) * b)
    shape = (world_size * b, *x.shape[1:])
    if noise == "gaussian":
        return x + sigma * torch.randn(shape, generator=generator, device=x.device)[rows], None
    u = torch.rand(shape, generator=generator, device=x.device)[rows].flatten(1)
    k = round(nu * u.shape[1])
    if k == 0:
        return x, torch.zeros_like(x, dtype=torch.bool)
    corrupted = (u <= u.kthvalue(k, dim=1, keepdim=True).values).reshape(x.shape)  # the k smallest draws of each row
    if noise == "masking":
        return x.masked_fill(corrupted, 0.0), corrupted
    salt = torch.rand(shape, generator=generator, device=x.device)[rows] < 0.5  # 1 (salt) or 0 (pepper)
    return torch.where(corrupted, salt.to(x.dtype), x), corrupted


# ALGO LOGIC: model. Encoder f_theta = the trunk's last feature map; decoder g_theta' = up-convolutions, linear output
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # the stacked scheme's layers, lowest first


def stage_modules(trunk):
    """The trunk as its layers for the stacked scheme: the stem (conv1, bn1, relu, maxpool), then layer1..layer4."""
    return [nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool),
            trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4]


def up_block(cin, cout):  # 4x4 stride-2 up-convolution, BN, ReLU (the DCGAN-style decoder of context_encoder.py)
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


def decoder(cin, cout, side, out_side):
    """(b, cin, side, side) -> (b, cout, out_side, out_side), light: a 1x1 convolution down to at most 256 maps, then
    up-convolutions doubling the side and halving the width (down to 16) until out_side is reached, then a 3x3
    convolution with no activation (the JMLR affine decoder for real values). ResNet-50 at 224 px: 0.20 GMACs an
    image, 5% of its trunk's 4.09."""
    width = min(256, cin)
    layers = [nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
    for _ in range(max(0, math.ceil(math.log2(out_side / side)))):
        layers.append(up_block(width, max(16, width // 2)))
        width = max(16, width // 2)
    return nn.Sequential(*layers, nn.Conv2d(width, cout, 3, padding=1))


class DenoisingAutoencoder(nn.Module):
    """The trunk and its decoders: one from the whole trunk's feature map back to the image; with stacked, one per
    stage instead, from its output back to its input (the image for the stem)."""

    def __init__(self, arch, image_size, stacked=False):
        super().__init__()
        self.trunk, _ = common.build_backbone(arch, image_size)
        self.trunk.eval()  # measure the stages' shapes without touching the BN statistics
        with torch.no_grad():
            shapes, h = [(3, image_size)], torch.zeros(1, 3, image_size, image_size)  # (channels, side) of each input
            for stage in stage_modules(self.trunk):
                h = stage(h)
                shapes.append((h.shape[1], h.shape[-1]))
        self.trunk.train()
        ends = list(zip(shapes, shapes[1:])) if stacked else [(shapes[0], shapes[-1])]  # (input, output) of each DAE
        self.decoders = nn.ModuleList(decoder(c_out, c_in, s_out, s_in) for (c_in, s_in), (c_out, s_out) in ends)
        self.sides = [s_in for (_, s_in), _ in ends]

    def encoder_decoder(self, layer=None):
        """The DAE a phase trains: the whole trunk and its decoder (layer None), or stage `layer` and its own.
        Built on call, not registered, so the checkpoint holds each weight once."""
        stages = stage_modules(self.trunk)
        if layer is None:
            return EncoderDecoder(nn.Sequential(*stages), self.decoders[0], self.sides[0])
        return EncoderDecoder(stages[layer], self.decoders[layer], self.sides[layer])


class EncoderDecoder(nn.Module):
    """x~ -> g(f(x~)), resized to the input's side when the strides do not halve it evenly (28 -> 4 -> 32 -> 28)."""

    def __init__(self, encoder, decoder, side):
        super().__init__()
        self.encoder, self.decoder, self.side = encoder, decoder, side

    def forward(self, x_tilde):
        z = self.decoder(self.encoder(x_tilde))
        return z if z.shape[-1] == self.side else F.interpolate(z, size=self.side, mode="bilinear", align_corners=False)


# ALGO LOGIC: loss. The reconstruction error against the CLEAN input, with the JMLR emphasis
def emphasised_error(z, x, corrupted, alpha, beta, loss="squared"):
    """Per component: squared error, or the cross-entropy L_IH(x, z) = -[x log s(z) + (1 - x) log(1 - s(z))] of
    targets x in [0, 1] and logits z, s the sigmoid (ICML 2008 Sec. 2.2), in fp32. JMLR's emphasis (Sec. 4.4, for
    both losses): alpha on the corrupted components, beta on the rest; plain when alpha = beta = 1 (and for Gaussian
    noise, which corrupts every component). Averaged over the components and the batch (the papers sum components)."""
    if loss == "cross-entropy":
        error = F.binary_cross_entropy_with_logits(z.float(), x.float(), reduction="none")  # stable in the logits
    else:
        error = (z.float() - x.float()) ** 2
    if corrupted is None or (alpha == 1 and beta == 1):
        return error.mean()
    return (torch.where(corrupted, alpha, beta) * error).mean()


def stacked_layer(epoch, epochs):
    """JMLR's greedy order: the epochs split evenly over the layers, the lowest first (--max-steps may end a run
    before its upper layers are reached)."""
    return min(len(STAGES) - 1, epoch * len(STAGES) // epochs)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    pretrain_set, *probe_sets = common.build_datasets(args, dae_augmentation(args))
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in common.MEAN_STD[args.dataset])

    # ALGO LOGIC: model and optimizer
    model = DenoisingAutoencoder(args.arch, args.image_size, args.stacked).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=args.lr)
    wrapped, phase = None, None

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        layer = stacked_layer(epoch, args.epochs) if args.stacked else None
        if wrapped is None or layer != phase:  # the DDP wrapper: what the ranks average (stacked: this layer only)
            phase, above_stem = layer, layer is not None and layer > 0
            frozen = nn.Sequential(*stage_modules(model.trunk)[:layer or 0])  # stacked: run without gradients
            wrapped = model.encoder_decoder(layer)  # the layers above this one are not run at all
            if common.world() > 1:  # per-GPU BN, as every method here
                for buffer in model.buffers():  # each rank's last BN update of the phase before: rank 0's, as on resume
                    dist.broadcast(buffer, 0)
                wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[device] if device.type == "cuda" else None)
            if args.compile:
                wrapped = torch.compile(wrapped)
        for group in optimizer.param_groups:  # constant (a choice: the papers keep SGD's lr fixed per layer)
            group["lr"] = args.lr
        model.train()
        frozen.eval()  # JMLR: the lower layers are fixed, their BN statistics included
        for step, (x, _, _) in enumerate(loader, start=sampler.start_step):
            x = x.to(device, non_blocking=True).float().div_(255)  # clean pixels in [0, 1]
            generator = common.step_generator(args.seed, run.global_step, device)
            if above_stem:  # the clean output of the frozen stages below is this layer's x
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    x = frozen((x - mean) / std).float()
            # above the stem --sigma stays in pixel units on BN-ReLU maps (deviation: JMLR's upper inputs are in [0, 1])
            x_tilde, corrupted = corrupt(x, args.noise, args.nu, args.sigma, generator)
            if not above_stem:  # the image: the encoder sees it normalised as every method's input
                x_tilde = (x_tilde - mean) / std
            if device.type == "cuda":
                x_tilde = x_tilde.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                z = wrapped(x_tilde)
            # L(x, g(f(x~))): the CLEAN x, for the stem the [0, 1] pixels (not the normalised x~ the trunk saw)
            loss = emphasised_error(z, x, corrupted, args.alpha, args.beta, args.loss)
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
