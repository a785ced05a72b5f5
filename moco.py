# MoCo: He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning",
# CVPR 2020 (arXiv:1911.05722); v2: Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive
# Learning" (arXiv:2003.04297). Defaults follow facebookresearch/moco (main_moco.py, moco/builder.py).
#
#   python moco.py --data /imagenet                                       # MoCo v1, one GPU (or CPU)
#   torchrun --nproc_per_node=8 moco.py --data /imagenet                  # MoCo v1, 8 GPUs
#   torchrun --nproc_per_node=8 moco.py --data /imagenet --mlp --moco-t 0.2 --aug-plus --cos   # MoCo v2
#
# Published ImageNet linear top-1 of ResNet-50 at 200 epochs (theirs, official README): v1 60.8, v2 67.5.
# CIFAR-10 recipe of the official demo (colab/moco_cifar10_demo.ipynb; theirs: kNN 82.6% at 200 epochs):
#   --dataset cifar10 --arch resnet18 --batch-size 512 --lr 0.03 (= its lr 0.06 at batch 512) --cos --wd 5e-4
#   --moco-k 4096 --moco-m 0.99 --moco-t 0.1 --bn-splits 8 --aug-plus (blur is off at <= 64 px, as in the demo;
#   the demo crops with scale 0.08-1 and its kNN reads the 128-d head output, ours the trunk: not like for like)
# Short runs (benchmarks/run.py): MoCo v2 with the demo's K 4096, m 0.99, T 0.1 at batch 128, --lr 0.06.
import argparse
import copy
import math
import os
from collections import OrderedDict
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v1/v2 pretraining + kNN / linear evaluation")
    # TRY NOT TO MODIFY: flags shared by every sslref method file
    p.add_argument("--dataset", default="imagefolder", choices=list(common.DEFAULT_IMAGE_SIZE), help="dataset kind")
    p.add_argument("--data", default="", help="dataset folder (imagefolder: DATA/train and DATA/val)")
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet name, or resnet-tiny for CPU runs")
    p.add_argument("--epochs", type=common.positive_int, default=200, help="pretraining epochs (official 200)")
    p.add_argument("--batch-size", type=common.positive_int, default=256, help="GLOBAL batch size, split over ranks")
    p.add_argument("--lr", type=common.nonneg_float, default=0.03, help="base lr per 256 images; peak = lr * batch / 256")
    p.add_argument("--wd", type=common.nonneg_float, default=1e-4, help="weight decay (official 1e-4)")
    p.add_argument("--workers", type=common.nonneg_int, default=min(8, os.cpu_count() or 1), help="data-loading workers per rank")
    p.add_argument("--device-augment", action=argparse.BooleanOptionalAction, default=True,
                   help="colour ops batched on the training device (no: PIL in the data workers)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init, data order, augmentations and training step")
    p.add_argument("--image-size", type=common.nonneg_int, default=0, help="crop size (0: the dataset's default)")
    p.add_argument("--subset", type=common.nonneg_int, default=0, help="use N evenly spaced training images (0: all)")
    p.add_argument("--max-steps", type=common.nonneg_int, default=0, help="stop (and checkpoint) after N steps in total (0: never)")
    p.add_argument("--save-every", type=common.nonneg_int, default=0, help="also checkpoint every N steps (0: at each epoch end only)")
    p.add_argument("--out", default="runs/moco", help="output folder: metrics.jsonl, checkpoint.pth, backbone.pth")
    p.add_argument("--resume", default="", help="checkpoint.pth to continue from (or backbone.pth with --eval-only)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate (the --resume weights, else random init)")
    p.add_argument("--baselines", action="store_true", help="also probe the random-init trunk and raw pixels (<= 64 px)")
    p.add_argument("--knn-k", type=common.positive_int, default=200, help="neighbours of the weighted kNN monitor")
    p.add_argument("--knn-t", type=common.positive_float, default=0.1, help="temperature of the weighted kNN monitor")
    p.add_argument("--probe-epochs", type=common.nonneg_int, default=100, help="epochs of the linear probe (0: kNN only)")
    p.add_argument("--eval-every", type=common.nonneg_int, default=0, help="kNN monitor every N epochs (0: only at the end)")
    p.add_argument("--monitor-subset", type=common.nonneg_int, default=0, help="the monitor's kNN on N class-balanced images of each probe set (0: all)")
    p.add_argument("--print-freq", type=common.positive_int, default=50, help="progress line every N steps")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    # ALGO LOGIC: MoCo hyper-parameters (official main_moco.py)
    p.add_argument("--momentum", type=common.unit_float, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[120, 160], help="epochs where lr drops x0.1 (without --cos)")
    p.add_argument("--cos", action="store_true", help="cosine lr schedule instead of --schedule (v2)")
    p.add_argument("--moco-dim", type=common.positive_int, default=128, help="feature dimension C")
    p.add_argument("--moco-k", type=common.positive_int, default=65536, help="queue size K: number of negative keys")
    p.add_argument("--moco-m", type=common.unit_float, default=0.999, help="momentum m of the key encoder update")
    p.add_argument("--moco-t", type=common.positive_float, default=0.07, help="softmax temperature T (v2: 0.2)")
    p.add_argument("--mlp", action="store_true", help="2-layer MLP head instead of one linear layer (v2)")
    p.add_argument("--aug-plus", action="store_true", help="v2 augmentation: colour jitter p=0.8 and Gaussian blur")
    p.add_argument("--bn-splits", type=common.positive_int, default=8,
                   help="one process only: BN over this many groups of the batch, to mimic per-GPU BN (demo: 8)")
    args = p.parse_args(argv)
    args.image_size = args.image_size or common.DEFAULT_IMAGE_SIZE[args.dataset]
    return args


# ALGO LOGIC: augmentations, written out as the official main_moco.py. The workers crop and flip; the colour ops run
# batched on the device (common.Augmentation). The flip moves ahead of them: a mirror commutes with per-pixel colour
# ops and with a symmetric blur, so the views are distributed as the official order makes them
def moco_augmentation(args):
    size = args.image_size
    if args.aug_plus:  # MoCo v2 (SimCLR-style)
        # official blurs with PIL's radius sigma; the device needs a kernel: 10% of the side as SimCLR.
        # The official CIFAR demo has no blur, so it is off at <= 64 px
        blur = [] if size <= 64 else [common.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0), p=0.5)]
        return common.Augmentation(args, views=2, geometry=[  # the query and its positive key
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
        ], photometric=[
            common.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            common.RandomGrayscale(p=0.2),
            *blur,
        ])
    return common.Augmentation(args, views=2, geometry=[  # MoCo v1 (as the InstDisc code)
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
    ], photometric=[
        common.RandomGrayscale(p=0.2),
        common.ColorJitter(0.4, 0.4, 0.4, 0.4),
    ])


# ALGO LOGIC: model
class SplitBatchNorm(nn.BatchNorm2d):
    """In training, BN over `num_splits` groups of the batch (sample i in group i % num_splits), as
    `num_splits` GPUs would each normalise their own share; in eval, ordinary BN. One process needs this
    for Shuffle BN to mean anything (official CIFAR demo; moco#26, moco#48)."""

    def __init__(self, num_features, num_splits):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)
        # (n, c, h, w) -> (n/s, s*c, h, w): channel block j holds the samples i with i % s == j
        out = F.batch_norm(x.reshape(-1, s * c, h, w), running_mean, running_var, self.weight.repeat(s),
                           self.bias.repeat(s), True, self.momentum, self.eps).reshape(n, c, h, w)
        self.running_mean.copy_(running_mean.view(s, c).mean(0))  # each group updated its copy: average them
        self.running_var.copy_(running_var.view(s, c).mean(0))
        return out


def build_encoder(args, norm_layer):
    """The ResNet trunk with its fc made the head: one linear layer to C, or (v2) a 2-layer MLP (builder.py)."""
    trunk, width = common.build_backbone(args.arch, args.image_size, norm_layer=norm_layer)
    fc = nn.Linear(width, args.moco_dim)
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), fc) if args.mlp else fc
    return nn.Sequential(OrderedDict(trunk=trunk, head=head))


class MoCo(nn.Module):
    """Query encoder f_q, momentum key encoder f_k and the queue of K keys (paper Sec. 3.2, Algorithm 1)."""

    def __init__(self, encoder, dim=128, K=65536, m=0.999):
        super().__init__()
        self.K, self.m = K, m
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)  # starts equal to f_q; never gets gradients
        # the queue starts as random unit vectors (builder.py); buffers, so checkpoints hold them
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.detach(), alpha=1 - self.m)  # theta_k <- m theta_k + (1-m) theta_q (Eq. 2)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k):
        """Replace the oldest keys by this step's keys of ALL ranks, so every rank holds the same queue."""
        keys = common.gather(k)  # (N, C), N the global batch; K % N == 0 is checked at start-up
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % self.K
        self.queue.index_copy_(1, slots, keys.T)  # on the device: no host sync to read the pointer
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % self.K)

    @torch.no_grad()
    def _batch_shuffle(self, x, generator):
        """Shuffle BN (Sec. 3.3): encode the keys in a random order, so that a key's BN statistics come from
        other samples than its query's: across ranks under DDP, across SplitBatchNorm groups in one process."""
        x_all = common.gather(x)  # (N, ...)
        idx_shuffle = torch.randperm(len(x_all), device=x.device, generator=generator)
        if common.is_distributed():
            dist.broadcast(idx_shuffle, 0)  # rank 0's permutation, as the official code
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if common.is_distributed() else (0, 1)
        idx_this = idx_shuffle.view(world_size, -1)[rank]
        return x_all[idx_this], torch.argsort(idx_shuffle)  # channels_last or not: the conv weights' layout wins

    @torch.no_grad()
    def _batch_unshuffle(self, x, idx_unshuffle):
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if common.is_distributed() else (0, 1)
        return common.gather(x)[idx_unshuffle.view(world_size, -1)[rank]]

    def forward(self, im_q, im_k, generator):
        """-> (q, k): L2-normalised queries (with gradient) and keys (without), (n, C) each, in fp32."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()  # before the keys are computed (Algorithm 1)
            im_k, idx_unshuffle = self._batch_shuffle(im_k, generator)
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            k = self._batch_unshuffle(k, idx_unshuffle)
        return q, k


# ALGO LOGIC: InfoNCE over the positive key and the queue (Eq. 1, Algorithm 1)
def moco_logits(q, k, queue, T):
    """q, k: (n, C) unit vectors; queue: (C, K). -> (logits (n, 1+K), labels (n,)): column 0 is the
    positive q.k, the others q.queue (a detached copy), all divided by T; the label is always 0."""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
    l_neg = q @ queue.clone().detach()  # (n, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    return logits, torch.zeros(len(q), dtype=torch.long, device=q.device)


def learning_rate(epoch, args):
    """Per epoch as the official adjust_learning_rate: cosine (v2) or x0.1 at each --schedule milestone."""
    lr = args.lr * args.batch_size / 256  # --lr is per 256 images; the official value at batch 256
    if args.cos:
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeding, data
    args = parse_args(argv)
    rank, world_size, device = common.init_distributed()
    if args.batch_size % world_size:
        common.fail(f"--batch-size {args.batch_size} is not divisible by the world size {world_size}; "
                    f"use a multiple of {world_size}")
    if args.moco_k % args.batch_size:  # whole batches enter the queue (the official assertion, moco#99)
        fit = args.moco_k // args.batch_size * args.batch_size
        common.fail(f"--moco-k {args.moco_k} is not divisible by --batch-size {args.batch_size}; use a multiple of "
                    f"{args.batch_size} such as {max(fit, args.batch_size)} or {fit + args.batch_size}, "
                    f"or a batch size that divides {args.moco_k}")
    split_bn = world_size == 1 and args.bn_splits > 1
    if split_bn and args.batch_size % args.bn_splits:
        common.fail(f"--batch-size {args.batch_size} is not divisible by --bn-splits {args.bn_splits}; "
                    "pick a divisor of the batch size")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    common.seed_everything(args.seed)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    augmentation = moco_augmentation(args)
    pretrain_set, probe_train_set, probe_test_set = common.build_datasets(args, augmentation)
    probe_train_loader = common.eval_loader(probe_train_set, args, world_size, rank)
    probe_test_loader = common.eval_loader(probe_test_set, args, world_size, rank)

    # per-GPU BN under DDP, as official: SyncBN would let a key see its query's batch (moco#46)
    norm_layer = partial(SplitBatchNorm, num_splits=args.bn_splits) if split_bn else nn.BatchNorm2d
    model = MoCo(build_encoder(args, norm_layer), args.moco_dim, args.moco_k, args.moco_m).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd)

    # TRY NOT TO MODIFY: resume, evaluation-only, DDP wrapper
    run = common.Run(args, model, optimizer, model.encoder_q.trunk, (probe_train_loader, probe_test_loader), device,
                     rank, world_size)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args, world_size, rank)
    ddp_model = model
    if world_size > 1:
        # every rank computes the same queue itself: broadcasting rank 0's buffers each step (DDP's default)
        # would resend K x C equal floats; evaluation and checkpoints use rank 0's BN statistics
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step)

    # ALGO LOGIC: training loop (Algorithm 1)
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        lr = learning_rate(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            im_q, im_k = augmentation.to_device(views, device).chunk(2)  # colour ops, normalisation
            generator = common.step_generator(args.seed, run.global_step, device)  # the shuffle's permutation
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                q, k = ddp_model(im_q, im_k, generator)
            logits, labels = moco_logits(q, k, model.queue, args.moco_t)  # fp32, outside autocast
            loss = F.cross_entropy(logits, labels)
            model._dequeue_and_enqueue(k)  # after the logits: this batch's keys are negatives from the next step
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
