# BYOL: Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot, Kavukcuoglu, Munos,
# Valko, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020 (arXiv:2006.07733).
# Defaults follow google-deepmind/deepmind-research byol/ (byol_experiment.py, configs/byol.py, utils/*.py).
#
#   torchrun --nproc_per_node=8 byol.py --data /imagenet                       # 1000 epochs, batch 4096 (paper)
#   torchrun --nproc_per_node=8 byol.py --data /imagenet --epochs 300          # the 300-epoch row of the table
#   python byol.py --data /imagenet --batch-size 256 --epochs 100              # one 80 GB GPU (lr, wd, EMA: 100's row)
#   python byol.py --dataset fashion-mnist --arch resnet-tiny --subset 10000 --epochs 5 --batch-size 256 \
#       --lr 2.0 --ema 0.99 --warmup-epochs 0.5 --baselines                    # a quick CPU run (below)
#
# Published ImageNet linear top-1 of ResNet-50 (theirs, paper Table 1): 74.3 at 1000 epochs, batch 4096.
# The quick CPU run (ours, on 2 CPU cores): kNN 66.8 / linear 77.6 against 53.0 / 65.3 for the same
# trunk at random init; z_std 0.047 (1/sqrt(256) = 0.0625 when fully spread, 0 when collapsed).
import argparse
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common

# the official table by epochs (configs/byol.py): base lr (per 256 images), weight decay, base EMA tau
RECIPES = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BYOL pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official: 1000 epochs at batch 4096, LARS, 10 warm-up epochs then cosine to 0 (configs/byol.py)
    by_epochs = "; default: the official table's row for --epochs (nearest of 40, 100, 300, 1000)"
    common.add_common_args(p, "byol", arch="resnet50", epochs=1000, batch_size=4096, lr=None, wd=None,
                           device_augment=True, lr_help="base lr per 256 images; peak = lr * batch / 256" + by_epochs,
                           wd_help="weight decay (LARS; biases and norms excluded)" + by_epochs)
    # ALGO LOGIC: BYOL hyper-parameters
    p.add_argument("--ema", type=common.unit_float, default=None,
                   help="base EMA tau of the target network, raised to 1 by a cosine over the steps" + by_epochs)
    p.add_argument("--warmup-epochs", type=common.nonneg_float, default=10, help="linear lr warm-up (official 10)")
    p.add_argument("--hidden-dim", type=common.positive_int, default=4096, help="hidden width of projector and predictor")
    p.add_argument("--proj-dim", type=common.positive_int, default=256, help="output width of projector and predictor")
    args = common.parse(p, argv)
    row = RECIPES[min(RECIPES, key=lambda e: abs(math.log(e / args.epochs)))]
    for name, value in zip(("lr", "wd", "ema"), row):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ema == 1:
        common.fail("--ema 1 would freeze the target network at its initialisation; use a value in [0, 1), e.g. 0.99")
    return args


# ALGO LOGIC: augmentations (paper Table 6, official utils/augmentations.py): the same crop, flip, colour jitter and
# grey for both views; blur and solarize with other probabilities per view, so each view is a group of its own.
# The workers crop and flip; the colour ops run batched on the device (common.Augmentation)
def byol_augmentation(args):
    size = args.image_size
    geometry = [  # official: bicubic resize of a single crop attempt (torchvision: up to 10, then a centre crop)
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    colour = [  # random order as official; torchvision's brightness is multiplicative (official: additive)
        common.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        common.RandomGrayscale(p=0.2),
    ]
    # official blur: 23 px kernel at 224 (a tenth of the side), sigma 0.1-2; none at <= 64 px (as SimCLR's CIFAR recipe)
    blur = lambda p: [] if size <= 64 else [common.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0), p=p)]
    return common.Augmentation(args.dataset, args.device_augment, [
        common.Views(1, geometry, [*colour, *blur(1.0), common.Solarize(p=0.0)]),  # view 1: always blurred
        common.Views(1, geometry, [*colour, *blur(0.1), common.Solarize(p=0.2)]),  # view 2: seldom, and solarized
    ])


# ALGO LOGIC: model. Online network: trunk f, projector g, predictor q; target network: trunk and projector only
def mlp(in_dim, hidden_dim, out_dim):
    """utils/networks.py MLP: Linear (with bias) -> BN -> ReLU -> Linear (no bias)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


def encoder(args):
    # haiku's ResNet starts each bottleneck's last BN scale at zero, as torchvision's zero_init_residual
    trunk, width = common.build_backbone(args.arch, args.image_size, zero_init_residual=True)
    return nn.Sequential(OrderedDict(trunk=trunk, projector=mlp(width, args.hidden_dim, args.proj_dim)))


class BYOL(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.online, self.predictor = encoder(args), mlp(args.proj_dim, args.hidden_dim, args.proj_dim)
        # official: the target gets its own random init (byol_experiment.py; a copy, it notes, made no difference)
        self.target = encoder(args).requires_grad_(False)

    @property
    def trunk(self):  # the online trunk: what the probes read and backbone.pth holds
        return self.online.trunk

    def forward(self, v1, v2):
        """-> (loss, z1): the symmetric loss of this rank's samples, and view 1's online projection (for the std)."""
        z1, z2 = self.online(v1), self.online(v2)  # one forward per view: BN statistics per view, as official
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():  # the target runs in training mode too (batch statistics), without gradient
            t1, t2 = self.target(v1), self.target(v2)
        return (regression_loss(p1, t2) + regression_loss(p2, t1)).mean(), z1

    @torch.no_grad()
    def update_target(self, tau):
        """t <- t + (1 - tau)(o - t) for every parameter (buffers stay the target's own), after the optimizer step."""
        torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1 - tau)  # one launch


# ALGO LOGIC: loss (Eq. 2, utils/helpers.py regression_loss): || q/|q| - z'/|z'| ||^2 = 2 - 2 cos, per sample; both
# directions summed per sample, then the batch mean (the mean over ranks is DDP's gradient average)
def regression_loss(p, z):
    return (F.normalize(p.float(), dim=-1) - F.normalize(z.float().detach(), dim=-1)).pow(2).sum(-1)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.batch_size // common.world() < 2:  # the heads' BN over one sample is undefined
        common.fail(f"--batch-size {args.batch_size} leaves 1 image per rank; the heads' BN needs 2 or more")
    augmentation = byol_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = BYOL(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # official BN statistics are cross-replica ('i' axis): SyncBN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif common.world() > 1:
        common.print0("note: SyncBatchNorm needs CUDA; on CPU each rank normalises its own batch")
    # LARS as utils/optimizers.py: weight decay, then the trust ratio, then momentum, then the lr (optax's chain); the
    # biases and norms (1-d) skip weight decay and adaptation. The target is not optimised
    trained = nn.ModuleList([model.online, model.predictor])
    optimizer = common.LARS(common.lars_groups(trained), lr=0.0, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share: the online gradients)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr)

    # ALGO LOGIC: training loop
    z_std = None
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            lr = common.cosine_lr(run.global_step, total_steps, warmup_steps, peak_lr)  # schedules.py learning_schedule
            for group in optimizer.param_groups:
                group["lr"] = lr
            v1, v2 = augmentation.to_device(views, device)  # a group per view
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                loss, z1 = ddp_model(v1, v2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # schedules.py target_ema: tau from --ema to 1 by a cosine over the steps, applied after the update
            model.update_target(common.cosine_momentum(run.global_step, total_steps, args.ema))
            if run.after_step(epoch, step, loss, lr):  # progress, checkpoints, monitor, divergence stop
                # the collapse check of SimSiam (Sec. 4.1): per-dimension std of the normalised projection over this
                # rank's batch (averaged over ranks), 1/sqrt(d) for well spread outputs, 0 when collapsed
                z_std = common.all_reduce(F.normalize(z1.detach().float(), dim=1).std(0).mean(), "mean").item()
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks
    return run.final_evaluation(extra=lambda: {} if z_std is None else {"z_std": z_std})


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
