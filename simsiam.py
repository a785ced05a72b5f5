# SimSiam: Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv:2011.10566).
# Defaults follow facebookresearch/simsiam (main_simsiam.py, simsiam/builder.py, simsiam/loader.py).
#
#   torchrun --nproc_per_node=8 simsiam.py --data /imagenet                    # 100 epochs, batch 512 (official)
#   python simsiam.py --data /imagenet --batch-size 256                        # one 80 GB GPU (lr scales by batch)
#   python simsiam.py --dataset fashion-mnist --arch resnet-tiny --subset 10000 --epochs 3 --batch-size 256 \
#       --lr 0.5 --probe-epochs 0 --baselines                                  # a quick CPU run (below)
#
# Published ImageNet linear top-1 of ResNet-50 (theirs, official README and paper Table 4): 68.1 at 100 epochs,
# batch 512, with a fixed predictor lr. The quick CPU run (ours, on 2 CPU cores, kNN only): 63.7 against 53.0 for
# the same trunk at random init; z_std 0.022 (1/sqrt(2048) = 0.022 when fully spread, 0 when collapsed).
import argparse
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SimSiam pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official: 100 epochs at batch 512, SGD lr 0.05 x batch / 256, momentum 0.9, wd 1e-4 (paper Sec. 4)
    common.add_common_args(p, "simsiam", arch="resnet50", epochs=100, batch_size=512, lr=0.05, wd=1e-4,
                           device_augment=True, wd_help="weight decay (SGD, on every parameter as official)")
    # ALGO LOGIC: SimSiam hyper-parameters
    p.add_argument("--dim", type=common.positive_int, default=2048, help="width of the projector's layers and output")
    p.add_argument("--pred-dim", type=common.positive_int, default=512, help="hidden width of the predictor")
    # the official flag defaults off, but its README's 100-epoch recipe (the 68.1 above) passes it
    p.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the predictor at the peak lr instead of the cosine (paper Sec. 4.2, Table 1's last row)")
    return common.parse(p, argv)


# ALGO LOGIC: augmentations (MoCo v2's, simsiam/loader.py and main_simsiam.py): two views drawn alike. The workers
# crop and flip; the colour ops run batched on the device (common.Augmentation)
def simsiam_augmentation(args):
    size = args.image_size
    # official blurs with PIL's radius sigma; the device needs a kernel: 10% of the side as SimCLR. None at <= 64 px:
    # the paper's CIFAR recipe has no blur
    blur = [] if size <= 64 else [common.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0), p=0.5)]
    return common.Augmentation(args.dataset, args.device_augment, [common.Views(2, geometry=[
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
    ], photometric=[
        common.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),  # "not strengthened" (official comment)
        common.RandomGrayscale(p=0.2),
        *blur,
    ])])


# ALGO LOGIC: model (builder.py). Encoder f = trunk + 3-layer projector; predictor h, a 2-layer bottleneck MLP
def projector(in_dim, dim):
    """Linear -> BN -> ReLU twice (no biases: BN follows), then the trunk's own fc (its bias frozen, as official:
    BN follows it too) and a BN without affine on the output."""
    out = nn.Linear(in_dim, dim)  # official: the torchvision ResNet's fc, built with num_classes=dim
    out.bias.requires_grad_(False)
    return nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                         nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                         out, nn.BatchNorm1d(dim, affine=False))


class SimSiam(nn.Module):
    def __init__(self, args):
        super().__init__()
        trunk, width = common.build_backbone(args.arch, args.image_size, zero_init_residual=True)  # as official
        self.encoder = nn.Sequential(OrderedDict(trunk=trunk, projector=projector(width, args.dim)))
        self.predictor = nn.Sequential(nn.Linear(args.dim, args.pred_dim, bias=False), nn.BatchNorm1d(args.pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(args.pred_dim, args.dim))

    @property
    def trunk(self):  # what the probes read and backbone.pth holds
        return self.encoder.trunk

    def forward(self, x1, x2):
        """-> (loss, z1): the symmetric loss of this rank's samples, and view 1's projection (for the std)."""
        z1, z2 = self.encoder(x1), self.encoder(x2)  # one forward per view: BN statistics per view, as official
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (D(p1, z2) + D(p2, z1)).mean() / 2, z1


# ALGO LOGIC: loss (Eq. 1-2, Algorithm 1): D(p, z) = -cos(p, stopgrad(z)); L = D(p1, z2)/2 + D(p2, z1)/2, the batch
# mean (the mean over ranks is DDP's gradient average: no gather, as official)
def D(p, z):
    return -F.cosine_similarity(p.float(), z.float().detach(), dim=-1)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.batch_size // common.world() < 2:  # the heads' BN over one sample is undefined
        common.fail(f"--batch-size {args.batch_size} leaves 1 image per rank; the heads' BN needs 2 or more")
    augmentation = simsiam_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = SimSiam(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # official: "Apply SyncBN" under DDP
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif common.world() > 1:
        common.print0("note: SyncBatchNorm needs CUDA; on CPU each rank normalises its own batch")
    peak_lr = args.lr * args.batch_size / 256  # paper Sec. 4: lr x BatchSize / 256
    # SGD with weight decay on every parameter (biases and BN too), as official; the frozen fc bias is left out
    optimizer = torch.optim.SGD([{"params": [p for p in model.encoder.parameters() if p.requires_grad], "fixed": False},
                                 {"params": list(model.predictor.parameters()), "fixed": args.fix_pred_lr}],
                                lr=peak_lr, momentum=0.9, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average: the gradients; nothing else is shared)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr)

    # ALGO LOGIC: training loop
    z_std = None
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        # official adjust_learning_rate: a cosine over epochs (constant within one), no warm-up; --fix-pred-lr's
        # group stays at the peak
        lr = common.cosine_lr(epoch, args.epochs, 0, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = peak_lr if group["fixed"] else lr
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            x1, x2 = augmentation.to_device(views, device)[0].chunk(2)  # one group of two views, view-major
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                loss, z1 = ddp_model(x1, x2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if run.after_step(epoch, step, loss, lr):  # progress, checkpoints, monitor, divergence stop
                # Sec. 4.1's collapse check: per-dimension std of the L2-normalised projection over this rank's last
                # batch (averaged over ranks): about 1/sqrt(d) when spread out, 0 when collapsed
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
