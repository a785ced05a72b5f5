# Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
# Reduction", ICML 2021 (arXiv:2103.03230). Defaults follow facebookresearch/barlowtwins (main.py).
#
#   torchrun --nproc_per_node=8 barlow_twins.py --data /imagenet               # 1000 epochs, batch 2048 (paper)
#   python barlow_twins.py --data /imagenet --batch-size 256 --epochs 300      # one 80 GB GPU (lr scales by batch)
#   python barlow_twins.py --dataset fashion-mnist --arch resnet-tiny --subset 10000 --epochs 3 --batch-size 256 \
#       --proj-dim 1024 --probe-epochs 0 --baselines                           # a quick CPU run (below)
#
# The projector's two 8192 x 8192 layers hold 134M weights (5.2 times ResNet-50's 25.6M; with their
# gradients and LARS' momentum 1.6 GB in fp32) and cost 134M multiply-adds an image (3.3% of ResNet-50's 4.1G at
# 224 px); the 8192 x 8192 cross-correlation adds 8192^2 x batch a step. --proj-dim sets the width (paper Fig. 4).
# Published ImageNet linear top-1 of ResNet-50 (theirs, paper Table 1): 73.2 at 1000 epochs, batch 2048.
# The quick CPU run (ours, on 2 CPU cores, kNN only; still in its warm-up): 64.0 against 53.0 for the same trunk at
# random init.
import argparse
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Barlow Twins pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official main.py: 1000 epochs at batch 2048, LARS, lr 0.2 for weights and 0.0048 for biases and BN, x batch / 256
    common.add_common_args(p, "barlow_twins", arch="resnet50", epochs=1000, batch_size=2048, lr=0.2, wd=1e-6,
                           device_augment=True,
                           lr_help="base lr of the weights per 256 images; peak = lr * batch / 256",
                           wd_help="weight decay (LARS; biases and norms excluded)")
    # ALGO LOGIC: Barlow Twins hyper-parameters
    p.add_argument("--lr-biases", type=common.nonneg_float, default=0.0048,
                   help="base lr of the biases and BN parameters per 256 images")
    p.add_argument("--lambd", type=common.nonneg_float, default=0.0051, help="weight of the off-diagonal term (lambda)")
    p.add_argument("--proj-dim", type=common.positive_int, default=8192, help="width of the projector's three layers")
    p.add_argument("--warmup-epochs", type=common.nonneg_float, default=10, help="linear lr warm-up (official 10)")
    return common.parse(p, argv)


# ALGO LOGIC: augmentations (paper Sec. 2 and App. A, official main.py Transform): BYOL's. Both views: crop (bicubic),
# flip, colour jitter, grey; blur and solarize with other probabilities per view, so each view is a group of its own.
# The workers crop and flip; the colour ops run batched on the device (common.Augmentation)
def barlow_augmentation(args):
    size = args.image_size
    geometry = [
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    colour = [  # torchvision's order as official (RandomApply of ColorJitter: a random order per sample)
        common.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        common.RandomGrayscale(p=0.2),
    ]
    # official blur: PIL's radius sigma 0.1-2; on the device a kernel of 10% of the side as SimCLR; none at <= 64 px
    blur = lambda p: [] if size <= 64 else [common.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0), p=p)]
    return common.Augmentation(args.dataset, args.device_augment, [
        common.Views(1, geometry, [*colour, *blur(1.0), common.Solarize(p=0.0)]),  # view 1: always blurred
        common.Views(1, geometry, [*colour, *blur(0.1), common.Solarize(p=0.2)]),  # view 2: seldom, and solarized
    ])


# ALGO LOGIC: model (main.py BarlowTwins): trunk, projector (Linear no bias -> BN -> ReLU) x 2 -> Linear no bias
def projector(in_dim, dim):
    return nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False))


class BarlowTwins(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.lambd = args.lambd
        trunk, width = common.build_backbone(args.arch, args.image_size, zero_init_residual=True)  # as official
        self.encoder = nn.Sequential(OrderedDict(trunk=trunk, projector=projector(width, args.proj_dim)))

    @property
    def trunk(self):  # what the probes read and backbone.pth holds
        return self.encoder.trunk

    def forward(self, y1, y2):
        """-> the loss of the global batch (the same on every rank)."""
        z1, z2 = self.encoder(y1), self.encoder(y2)  # one forward per view: BN statistics per view, as official
        with torch.autocast(z1.device.type, enabled=False):  # the moments and c in fp32, also under autocast
            return barlow_loss(cross_correlation(z1, z2), self.lambd)


def all_reduce(x):
    """Sum over the ranks, with gradient: backward sums every rank's gradient too (see cross_correlation)."""
    return dist_nn.all_reduce(x) if common.world() > 1 else x


def global_batch_norm(z, eps=1e-5):
    """BatchNorm1d(affine=False) in training mode over the GLOBAL batch: what the official SyncBatchNorm computes
    (biased variance, eps 1e-5), on every backend, from summed moments."""
    n = len(z) * common.world()
    moments = all_reduce(torch.stack([z.sum(0), z.pow(2).sum(0)])) / n
    mean, var = moments[0], moments[1] - moments[0].pow(2)
    return (z - mean) / (var + eps).sqrt()


# ALGO LOGIC: loss (Eq. 1-2, main.py forward): the cross-correlation of the two views' normalised embeddings over the
# global batch, c = bn(z1)^T bn(z2) / N, summed over the ranks; sum (1 - c_ii)^2 + lambda sum_{i != j} c_ij^2.
# Deviation, named: the official all_reduce has no gradient, so under DDP's average each rank's gradient is 1/world of
# the loss's (barlowtwins issue #8); here the all-reduce passes the gradient back, and any world size equals one process
def cross_correlation(z1, z2):
    z1, z2 = global_batch_norm(z1.float()), global_batch_norm(z2.float())
    return all_reduce(z1.T @ z2 / (len(z1) * common.world()))


def barlow_loss(c, lambd):
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.batch_size // common.world() < 2:  # the embedding's batch norm over one sample is undefined
        common.fail(f"--batch-size {args.batch_size} leaves 1 image per rank; the embedding's batch norm needs 2 "
                    "or more")
    augmentation = barlow_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = BarlowTwins(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # official: SyncBatchNorm for the trunk's and projector's BN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif common.world() > 1:
        common.print0("note: SyncBatchNorm needs CUDA; on CPU each rank's trunk and projector normalise their own "
                      "batch")
    # LARS as main.py: two groups, the weights and the biases / BN parameters (1-d: no weight decay, no adaptation)
    optimizer = common.LARS(common.lars_groups(model), lr=0.0, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average: the gradients; c and the embedding's moments are summed)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    scale = args.batch_size / 256  # main.py adjust_learning_rate: lr x batch / 256 per group
    run.start(steps_per_epoch, start_epoch, start_step, args.lr * scale)

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            # linear warm-up, then a cosine down to 0.001 of the peak, per step (main.py adjust_learning_rate)
            factor = common.cosine_lr(run.global_step, total_steps, warmup_steps, 1.0, end=0.001)
            weights, biases = optimizer.param_groups
            weights["lr"], biases["lr"] = args.lr * scale * factor, args.lr_biases * scale * factor
            y1, y2 = augmentation.to_device(views, device)  # a group per view
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                loss = ddp_model(y1, y2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if run.after_step(epoch, step, loss, weights["lr"]):  # progress, checkpoints, monitor, divergence stop
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks
    return run.final_evaluation()


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
