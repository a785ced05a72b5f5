# SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
# Representations", ICML 2020 (arXiv:2002.05709); defaults follow google-research/simclr (v1).
#
# CIFAR recipe of the official README: --dataset cifar10 --arch resnet18 --batch-size 512 --epochs 1000
#   --lr 1.0 --wd 1e-4 --temperature 0.5 --color-jitter-strength 0.5 (blur is off at <= 64 px).
# Short runs and small batches (benchmarks/run.py; the README's first command): --lr-scaling sqrt --lr 0.075
#   (App. B.1: square-root scaling at 0.075 is better for small batches and few epochs) --warmup-epochs 0.5
#   --color-jitter-strength 0.5 (CIFAR's).
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SimCLR pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # the official ImageNet run: 100 to 800 epochs, LARS at 0.3 x batch / 256, weight decay 1e-6 (paper App. B.1)
    common.add_common_args(p, "simclr", arch="resnet50", epochs=100, batch_size=4096, lr=0.3, wd=1e-6,
                           device_augment=True, lr_help="base lr; peak = lr * batch / 256 (see --lr-scaling)")
    # ALGO LOGIC: SimCLR hyper-parameters
    p.add_argument("--temperature", type=common.positive_float, default=0.1, help="NT-Xent temperature tau (ImageNet 0.1, CIFAR 0.5)")
    p.add_argument("--lr-scaling", default="linear", choices=["linear", "sqrt"],
                   help="peak lr = lr * batch / 256 (linear) or lr * sqrt(batch) (sqrt: App. B.1, with --lr 0.075 for "
                        "small batches and short runs); the official learning_rate_scaling")
    p.add_argument("--warmup-epochs", type=common.nonneg_float, default=10, help="linear lr warm-up before cosine decay")
    p.add_argument("--color-jitter-strength", type=common.nonneg_float, default=1.0, help="s of the colour distortion (CIFAR 0.5)")
    p.add_argument("--proj-dim", type=common.positive_int, default=128, help="output width of the projection head g")
    args = common.parse(p, argv)
    return args


# ALGO LOGIC: augmentations (paper Appendix A). The workers crop and flip; the colour ops run batched on the device
# (common.Augmentation), each view with its own parameters
def simclr_augmentation(args):
    s, size = args.color_jitter_strength, args.image_size
    # blur kernel is 10% of the side (odd); the CIFAR recipe drops blur for small images
    blur = [] if size <= 64 else [common.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0), p=0.5)]
    return common.Augmentation(args.dataset, args.device_augment, [common.Views(2, geometry=[
        # official: bicubic resize, up to 100 crop tries (torchvision tries 10, then centre-crops)
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ], photometric=[
        # random order as official; torchvision's brightness is multiplicative (official v1: additive)
        common.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8),
        common.RandomGrayscale(p=0.2),
        *blur,
    ])])  # normalised on the device: official feeds [0, 1] pixels; mean/std scaling is a BN-neutral habit


# ALGO LOGIC: model. h = f(x) is the ResNet trunk, z = g(h) the projection head (Sec. 2.1)
class SimCLR(nn.Module):
    def __init__(self, arch, image_size, proj_dim=128):
        super().__init__()
        # official ResNet starts each residual block's last BN scale at zero (resnet.py init_zero)
        self.trunk, dim = common.build_backbone(arch, image_size, zero_init_residual=True)
        # g: 2-layer MLP with BN, hidden width = trunk width, output 128 (official num_nlh_layers=1)
        self.projector = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))
        for layer in self.projector[0], self.projector[3]:
            nn.init.normal_(layer.weight, std=0.01)  # official dense layers: N(0, 0.01)
        self.projector[-1].bias.requires_grad_(False)  # official: last BN scales but does not centre

    def forward(self, x):
        return self.projector(self.trunk(x))


# ALGO LOGIC: NT-Xent loss over the global batch (Sec. 2.1, Eq. 1; official objective.py)
def nt_xent_loss(z1, z2, temperature):
    """z1, z2: (n, d) this rank's projections of the two views. Anchors are the 2n local rows;
    candidates are all 2N rows of the global batch, gathered with gradient. Each anchor's
    positive is its other view, and every other row except itself is a negative (2N - 2).
    Returns the mean over anchors, as Eq. 1 (the official code sums the two directions: 2x)."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # cosine sim; fp32 logits
    n = z1.shape[0]
    rank = common.rank()
    all_z1, all_z2 = common.gather_with_grad(z1), common.gather_with_grad(z2)  # (N, d) each
    N = all_z1.shape[0]
    logits = torch.cat([z1, z2]) @ torch.cat([all_z1, all_z2]).T / temperature  # (2n, 2N)
    mine = torch.arange(n, device=z1.device) + rank * n  # this rank's rows in the global batch
    self_idx, positive_idx = torch.cat([mine, mine + N]), torch.cat([mine + N, mine])
    self_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self_idx[:, None], True)
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive_idx)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    augmentation = simclr_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = SimCLR(args.arch, args.image_size, args.proj_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # global BN: statistics over the whole batch, as the paper (Sec. 2.2)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif common.world() > 1:
        common.print0("note: SyncBatchNorm needs CUDA; on CPU each rank normalises its own batch")
    # LARS as the official lars_optimizer.py: biases and BN parameters (the 1-d ones) skip weight decay and adaptation,
    # and the lr enters the momentum buffer (TF's MomentumOptimizer)
    optimizer = common.LARS(common.lars_groups(model), lr=0.0, weight_decay=args.wd, lr_in_momentum=True)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    # official learning_rate_scaling: 'linear' (the default) or 'sqrt', which App. B.1 finds better for small batches
    peak_lr = args.lr * (args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size))
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr)

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            lr = common.cosine_lr(run.global_step, total_steps, warmup_steps, peak_lr)  # official learning_rate_schedule
            for group in optimizer.param_groups:
                group["lr"] = lr
            # both views in one forward (view 1 of every image, then view 2), so BN normalises them together (official)
            (x,) = augmentation.to_device(views, device)  # one group of two views
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                z1, z2 = ddp_model(x).chunk(2)
            # official objective sums the two directions (2x Eq. 1); under LARS this scale sets
            # the steps of the non-adapted BN and bias parameters, so keep it
            loss = 2 * nt_xent_loss(z1, z2, args.temperature)
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
