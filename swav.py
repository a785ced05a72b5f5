# SwAV: Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by Contrasting
# Cluster Assignments", NeurIPS 2020 (arXiv:2006.09882). Defaults follow facebookresearch/swav (main_swav.py,
# src/resnet50.py, src/multicropdataset.py, scripts/*.sh).
#
#   torchrun --nnodes=8 --nproc_per_node=8 swav.py --data /imagenet           # 800 epochs, batch 4096 (paper)
#   torchrun --nproc_per_node=8 swav.py --data /imagenet --batch-size 256 --epochs 400   # the README's batch-256 run
#   python swav.py --data /imagenet --batch-size 256 --epochs 200              # one 80 GB GPU: about 60 GiB (below)
#   python swav.py --dataset fashion-mnist --arch resnet-tiny --subset 10000 --epochs 7 --batch-size 256 --lr 4.8 \
#       --final-lr 0.0048 --freeze-prototypes-niters 39 --nmb-prototypes 100 --nmb-crops 2 2 --baselines   # quick, CPU
#
# Published ImageNet linear top-1 of ResNet-50 (theirs, the official README): 75.3 at 800 epochs and batch 4096
# (2 x 224 + 6 x 96 crops); 74.3 at 400 epochs and 72.7 at 200 with batch 256 and the queue. Memory: ResNet-50 keeps
# about 245 MiB an image (those 8 crops) for backward in bf16, counted on the CPU.
import argparse
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common

# the official recipes by batch size (scripts/swav_800ep_pretrain.sh; README's and swav_*_bs256_pretrain.sh): lr
# (not rescaled), final lr, warm-up epochs, warm-up start, queue length, iterations the prototypes stay frozen
RECIPES = {4096: dict(lr=4.8, final_lr=0.0048, warmup_epochs=10, start_warmup=0.3, queue_length=0,
                      freeze_prototypes_niters=313),
           256: dict(lr=0.6, final_lr=0.0006, warmup_epochs=0, start_warmup=0.0, queue_length=3840,
                     freeze_prototypes_niters=5005)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SwAV pretraining + kNN / linear evaluation")
    by_batch = "; default: the official recipe for --batch-size (nearest of 256 and 4096)"
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official: SGD under LARC, weight decay 1e-6 on every parameter, a cosine per step after a linear warm-up
    common.add_common_args(p, "swav", arch="resnet50", epochs=800, batch_size=4096, lr=None, wd=1e-6,
                           device_augment=True, lr_help="peak lr, used as given (the official recipes do not rescale it)"
                           + by_batch, wd_help="weight decay (LARC folds it into the trust ratio; every parameter)")
    # ALGO LOGIC: SwAV hyper-parameters (main_swav.py's argparse)
    a = p.add_argument
    a("--final-lr", type=common.nonneg_float, default=None, help="lr at the end of the cosine" + by_batch)
    a("--warmup-epochs", type=common.nonneg_int, default=None, help="linear lr warm-up" + by_batch)
    a("--start-warmup", type=common.nonneg_float, default=None, help="lr at the start of the warm-up" + by_batch)
    a("--nmb-crops", type=common.nonneg_int, nargs="+", default=[2, 6], help="crops per size (the first: global)")
    a("--size-crops", type=common.positive_int, nargs="+", default=None,
      help="side of each size's crops (default: --image-size, then 96 at 224 and in proportion at other sizes)")
    a("--min-scale-crops", type=common.unit_float, nargs="+", default=[0.14, 0.05], help="smallest area, per size")
    a("--max-scale-crops", type=common.unit_float, nargs="+", default=[1.0, 0.14], help="largest area, per size")
    a("--crops-for-assign", type=common.nonneg_int, nargs="+", default=[0, 1], help="crops whose codes are predicted")
    a("--temperature", type=common.positive_float, default=0.1, help="softmax temperature of the swapped prediction")
    a("--epsilon", type=common.positive_float, default=0.05, help="entropy regularisation of Sinkhorn-Knopp")
    a("--sinkhorn-iterations", type=common.positive_int, default=3, help="Sinkhorn-Knopp iterations")
    a("--feat-dim", type=common.positive_int, default=128, help="projection width")
    a("--hidden-mlp", type=common.positive_int, default=2048, help="hidden width of the projection head")
    a("--nmb-prototypes", type=common.positive_int, default=3000, help="prototypes (K)")
    a("--queue-length", type=common.nonneg_int, default=None,
      help="embeddings kept from past batches for the codes, all ranks together (0: none)" + by_batch)
    a("--epoch-queue-starts", type=common.nonneg_int, default=15, help="epoch the queue starts filling")
    a("--freeze-prototypes-niters", type=common.nonneg_int, default=None,
      help="first iterations the prototypes get no update" + by_batch)
    args = common.parse(p, argv)
    row = RECIPES[min(RECIPES, key=lambda b: abs(math.log(b / args.batch_size)))]
    for name, value in row.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size_crops is None:
        args.size_crops = [args.image_size] + [round(args.image_size * 96 / 224)] * (len(args.nmb_crops) - 1)
    lists = ("nmb_crops", "size_crops", "min_scale_crops", "max_scale_crops")
    if len({len(getattr(args, name)) for name in lists}) > 1:
        common.fail("give --nmb-crops, --size-crops, --min-scale-crops and --max-scale-crops one value per crop size")
    if not args.nmb_crops[0] or args.size_crops[0] != args.image_size:
        common.fail(f"the first crop size holds the global crops: give it 1 or more crops at --image-size "
                    f"{args.image_size} (--nmb-crops {' '.join(map(str, args.nmb_crops))}, --size-crops "
                    f"{' '.join(map(str, args.size_crops))})")
    if max(args.size_crops) > args.size_crops[0]:
        common.fail(f"--size-crops {' '.join(map(str, args.size_crops))}: a local crop is larger than the global ones")
    if max(args.crops_for_assign) >= sum(args.nmb_crops) or sum(args.nmb_crops) < 2:
        common.fail(f"--crops-for-assign {' '.join(map(str, args.crops_for_assign))} needs crops numbered below "
                    f"{sum(args.nmb_crops)} (the sum of --nmb-crops, at least 2)")
    if any(not 0 < lo <= hi for lo, hi in zip(args.min_scale_crops, args.max_scale_crops)):
        common.fail("each --min-scale-crops must be above 0 and at most its --max-scale-crops")
    if args.queue_length % args.batch_size:  # official: rounds it down to a multiple without a word
        common.fail(f"--queue-length {args.queue_length} is not a multiple of --batch-size {args.batch_size}; use "
                    f"{args.queue_length - args.queue_length % args.batch_size or args.batch_size}")
    return args


# ALGO LOGIC: augmentations (paper Sec. 4 and Appendix, src/multicropdataset.py): for every crop, a random resized
# crop of its size and scale range, flip, colour distortion of strength 1 (jitter 0.8, 0.8, 0.8, 0.2 with p 0.8,
# grey p 0.2) and a Gaussian blur half the time; no solarize. A group per crop size. Normalised with the dataset's
# mean and std (official: red's std 0.228, ImageNet's 0.229: a deviation)
def swav_augmentation(args):
    colour = [common.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), common.RandomGrayscale(p=0.2)]
    # official blur: PIL's radius (sigma) 0.1-2 on every crop, untruncated; 13 taps hold +-3 sigma of the largest.
    # None at <= 64 px, as SimCLR's CIFAR recipe (a deviation where it applies)
    blur = [] if args.image_size <= 64 else [common.GaussianBlur(13, sigma=(0.1, 2.0), p=0.5)]
    return common.Augmentation(args.dataset, args.device_augment, [
        common.Views(n, [T.RandomResizedCrop(size, scale=(lo, hi)), T.RandomHorizontalFlip()], [*colour, *blur])
        for n, size, lo, hi in zip(args.nmb_crops, args.size_crops, args.min_scale_crops, args.max_scale_crops) if n])


# ALGO LOGIC: model (src/resnet50.py): trunk, projection head Linear -> BN -> ReLU -> Linear 128, L2 normalisation,
# prototypes as a bias-free linear layer (K x 128, rows normalised before every step)
class SwAV(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.trunk, width = common.build_backbone(args.arch, args.image_size)  # torchvision's init, no zero-init
        self.projection_head = nn.Sequential(nn.Linear(width, args.hidden_mlp), nn.BatchNorm1d(args.hidden_mlp),
                                             nn.ReLU(inplace=True), nn.Linear(args.hidden_mlp, args.feat_dim))
        self.prototypes = nn.Linear(args.feat_dim, args.nmb_prototypes, bias=False)
        # the queue of every rank, rank r using rows r Q / world on (official: a queue per rank, in queue{r}.pth);
        # Sinkhorn sums over all ranks' rows, so how they are split does not matter, and the checkpoint holds them all
        self.register_buffer("queue", torch.zeros(len(args.crops_for_assign), args.queue_length, args.feat_dim))

    def forward(self, crops):
        """crops: a batch per crop size, view-major -> (embeddings z, scores z C^T), crop by crop."""
        z = F.normalize(self.projection_head(common.multi_crop(self.trunk, crops)), dim=1)
        return z, self.prototypes(z)

    @torch.no_grad()
    def normalize_prototypes(self):
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


# ALGO LOGIC: Sinkhorn-Knopp (Sec. 3.1 and Appendix A.1, main_swav.py distributed_sinkhorn): codes Q of the scores,
# rows (prototypes) summing to 1/K and columns (samples) to 1/B, over the samples of all ranks: the total and the row
# sums are all-reduced, each column is normalised where it lies. Returns Q^T scaled so each sample's codes sum to 1
@torch.no_grad()
def sinkhorn(scores, epsilon, iterations):
    Q = torch.exp(scores / epsilon).t()  # K x n: no max subtracted, as official (scores are cosines: |s| <= 1)
    K, B = Q.shape[0], Q.shape[1] * common.world()
    Q /= common.all_reduce(Q.sum())
    for _ in range(iterations):
        Q /= common.all_reduce(Q.sum(dim=1, keepdim=True))
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


# ALGO LOGIC: swapped prediction (Eq. 1-3, main_swav.py train): the codes of each crop in --crops-for-assign, computed
# from its scores (after the queue's, once the queue is full), predicted from every other crop by a softmax at
# temperature 0.1; the cross-entropies averaged over the other crops and then over the assigned crops
def swav_loss(z, scores, model, args, use_queue):
    bs, ncrops, loss = len(scores) // sum(args.nmb_crops), sum(args.nmb_crops), 0.0
    log_p = F.log_softmax(scores.float() / args.temperature, dim=1).chunk(ncrops)  # once per crop
    for i, c in enumerate(args.crops_for_assign):
        with torch.no_grad():
            out = scores[c * bs:(c + 1) * bs].detach().float()
            if use_queue is not None:  # from --epoch-queue-starts: filled every step, read once full
                Q = len(model.queue[i]) // common.world()
                if use_queue:
                    mine = model.queue[i, common.rank() * Q:(common.rank() + 1) * Q]
                    out = torch.cat([mine @ model.prototypes.weight.float().t(), out])
                model.queue[i] = torch.cat([common.gather(z[c * bs:(c + 1) * bs].float()), model.queue[i, :-bs * common.world()]])
            q = sinkhorn(out, args.epsilon, args.sinkhorn_iterations)[-bs:]
        loss = loss + sum(-(q * log_p[v]).sum(1).mean() for v in range(ncrops) if v != c) / (ncrops - 1)
    return loss / len(args.crops_for_assign)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.batch_size // common.world() < 2:  # the head's BN over one sample is undefined
        common.fail(f"--batch-size {args.batch_size} leaves 1 image per rank; the head's BN needs 2 or more")
    augmentation = swav_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = SwAV(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # official: torch's SyncBN (argparse default) or apex's in groups of 8 (the scripts)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif common.world() > 1:
        common.print0("note: SyncBatchNorm needs CUDA; on CPU each rank normalises its own batch")
    # SGD (momentum 0.9) under apex's LARC (trust 0.001, clip off), one group: every parameter decayed and adapted
    optimizer = common.LARS(model.parameters(), lr=0.0, weight_decay=args.wd, larc=True)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average: the gradients; Sinkhorn all-reduces its sums)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    run.start(steps_per_epoch, start_epoch, start_step, args.lr)

    # ALGO LOGIC: training loop (main_swav.py train)
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            k = run.global_step
            lr = common.cosine_schedule(k, total_steps, warmup_steps, args.lr, args.final_lr, start=args.start_warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.normalize_prototypes()  # every step, frozen or not
            crops = augmentation.to_device(views, device)  # a batch per crop size
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # bf16 (official: apex fp16, O1): a deviation
                z, scores = ddp_model(crops)
            # the queue: filled from --epoch-queue-starts on, read once full (official: once its last row is non-zero)
            queue_step = k - args.epoch_queue_starts * steps_per_epoch
            use_queue = (queue_step >= args.queue_length // args.batch_size) if args.queue_length and queue_step >= 0 else None
            loss = swav_loss(z.detach(), scores, model, args, use_queue)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if k < args.freeze_prototypes_niters:  # no gradient: LARC and SGD skip the prototypes (decay included)
                model.prototypes.weight.grad = None
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
