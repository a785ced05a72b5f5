# VICReg: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
# Learning", ICLR 2022 (arXiv:2105.04906). Defaults follow facebookresearch/vicreg (main_vicreg.py, resnet.py).
#
#   torchrun --nproc_per_node=8 vicreg.py --data /imagenet                     # 1000 epochs, batch 2048 (paper)
#   torchrun --nproc_per_node=8 vicreg.py --data /imagenet --epochs 100 --batch-size 512 --lr 0.3   # the README's
#   python vicreg.py --data /imagenet --epochs 100 --batch-size 256 --lr 0.3   # one 80 GB GPU, the README's lr
#   python vicreg.py --dataset fashion-mnist --arch resnet-tiny --subset 10000 --epochs 3 --batch-size 256 \
#       --proj-dim 1024 --probe-epochs 0 --baselines                           # a quick CPU run (below)
#
# The expander's two 8192 x 8192 layers hold 134M weights (5.2 times ResNet-50's 25.6M; with their
# gradients and LARS' momentum 1.6 GB in fp32) and cost 134M multiply-adds an image (3.3% of ResNet-50's 4.1G at
# 224 px); each covariance matrix adds 8192^2 x batch a step. --proj-dim sets the width (paper Table 5 varies it).
# Published ImageNet linear top-1 of ResNet-50 (theirs, paper Table 1 and official README): 73.2 at 1000 epochs.
# The quick CPU run (ours, on 2 CPU cores, kNN only; still in its warm-up): 62.4 against 53.0 for the same trunk at
# random init.
import argparse
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="VICReg pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official main_vicreg.py: batch 2048, LARS at base lr 0.2 x batch / 256, wd 1e-6; 1000 epochs for the paper's
    # figures (main_vicreg.py's own default is 100, which its README runs at batch 512 and lr 0.3)
    common.add_common_args(p, "vicreg", arch="resnet50", epochs=1000, batch_size=2048, lr=0.2, wd=1e-6,
                           device_augment=True, wd_help="weight decay (LARS; biases and norms excluded)")
    # ALGO LOGIC: VICReg hyper-parameters
    p.add_argument("--sim-coeff", type=common.nonneg_float, default=25.0, help="weight of the invariance term (lambda)")
    p.add_argument("--std-coeff", type=common.nonneg_float, default=25.0, help="weight of the variance term (mu)")
    p.add_argument("--cov-coeff", type=common.nonneg_float, default=1.0, help="weight of the covariance term (nu)")
    p.add_argument("--proj-dim", type=common.positive_int, default=8192, help="width of the expander's three layers")
    p.add_argument("--warmup-epochs", type=common.nonneg_float, default=10, help="linear lr warm-up (official 10)")
    return common.parse(p, argv)


# ALGO LOGIC: augmentations (paper App. C, official augmentations.py): BYOL's, as Barlow Twins. Both views: crop
# (bicubic), flip, colour jitter, grey; blur and solarize with other probabilities per view, a group each. The workers
# crop and flip; the colour ops run batched on the device (common.Augmentation)
def vicreg_augmentation(args):
    size = args.image_size
    geometry = [
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    colour = [
        common.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        common.RandomGrayscale(p=0.2),
    ]
    # official blur: PIL's radius sigma 0.1-2; on the device a kernel of 10% of the side as SimCLR; none at <= 64 px
    blur = lambda p: [] if size <= 64 else [common.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0), p=p)]
    return common.Augmentation(args.dataset, args.device_augment, [
        common.Views(1, geometry, [*colour, *blur(1.0), common.Solarize(p=0.0)]),  # view 1: always blurred
        common.Views(1, geometry, [*colour, *blur(0.1), common.Solarize(p=0.2)]),  # view 2: seldom, and solarized
    ])


# ALGO LOGIC: model (main_vicreg.py Projector): trunk, expander (Linear with bias -> BN -> ReLU) x 2 -> Linear no bias
def expander(in_dim, dim):
    return nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim, bias=False))


class VICReg(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.coeffs = args.sim_coeff, args.std_coeff, args.cov_coeff
        trunk, width = common.build_backbone(args.arch, args.image_size, zero_init_residual=True)  # as official
        self.encoder = nn.Sequential(OrderedDict(trunk=trunk, expander=expander(width, args.proj_dim)))

    @property
    def trunk(self):  # what the probes read and backbone.pth holds
        return self.encoder.trunk

    def forward(self, x, y):
        """-> (loss, its three terms): invariance on this rank's batch, variance and covariance on the global one."""
        z_x, z_y = self.encoder(x), self.encoder(y)  # one forward per view: BN statistics per view, as official
        with torch.autocast(z_x.device.type, enabled=False):  # the covariances in fp32, also under autocast
            return vicreg_loss(z_x.float(), z_y.float(), *self.coeffs)


# ALGO LOGIC: loss (Eq. 1-6, main_vicreg.py VICReg.forward). Invariance: MSE of this rank's pairs (DDP's average makes
# it the global mean). Then the embeddings of every rank, gathered with gradient (FullGatherLayer: backward sums every
# rank's gradient for our slice), centred: variance, a hinge on sqrt(var + 1e-4) at 1, half per branch; covariance, the
# squared off-diagonal of each branch's covariance (divided by N - 1), over the dimension d, summed over the branches
def vicreg_loss(z_x, z_y, sim_coeff, std_coeff, cov_coeff):
    invariance = F.mse_loss(z_x, z_y)
    x, y = common.gather_with_grad(z_x), common.gather_with_grad(z_y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = (x.var(0) + 1e-4).sqrt(), (y.var(0) + 1e-4).sqrt()
    variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    n, d = x.shape
    covariance = off_diagonal_squares(x.T @ x / (n - 1)) / d + off_diagonal_squares(y.T @ y / (n - 1)) / d
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, torch.stack([invariance, variance, covariance]).detach()


def off_diagonal_squares(c):
    return c.pow(2).sum() - torch.diagonal(c).pow(2).sum()


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.batch_size // common.world() < 2:  # the expander's BN and the std over one sample is undefined
        common.fail(f"--batch-size {args.batch_size} leaves 1 image per rank; the expander's BN and the std need "
                    "2 or more")
    augmentation = vicreg_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = VICReg(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # official: SyncBatchNorm
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif common.world() > 1:
        common.print0("note: SyncBatchNorm needs CUDA; on CPU each rank normalises its own batch")
    # LARS as main_vicreg.py: one lr for all; biases and BN parameters (1-d) get no weight decay and no adaptation
    optimizer = common.LARS(common.lars_groups(model), lr=0.0, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average: the gradients; the embeddings are gathered in the loss)
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
    terms = None
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            # linear warm-up, then a cosine down to 0.001 of the peak, per step (main_vicreg.py adjust_learning_rate)
            lr = common.cosine_lr(run.global_step, total_steps, warmup_steps, peak_lr, end=0.001 * peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = augmentation.to_device(views, device)  # a group per view
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                loss, terms = ddp_model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if run.after_step(epoch, step, loss, lr):  # progress, checkpoints, monitor, divergence stop
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks; the last step's terms, averaged over ranks
    final = {} if terms is None else dict(zip(("invariance", "variance", "covariance"),
                                              common.all_reduce(terms, "mean").tolist()))
    return run.final_evaluation(extra=lambda: final)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
