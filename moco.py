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
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official main_moco.py: 200 epochs, lr 0.03 at batch 256, weight decay 1e-4
    common.add_common_args(p, "moco", arch="resnet50", epochs=200, batch_size=256, lr=0.03, wd=1e-4,
                           device_augment=True)
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
    args = common.parse(p, argv)
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
        return common.Augmentation(args.dataset, args.device_augment, [common.Views(2, geometry=[  # query and key
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
        ], photometric=[
            common.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            common.RandomGrayscale(p=0.2),
            *blur,
        ])])
    return common.Augmentation(args.dataset, args.device_augment, [common.Views(2, geometry=[  # MoCo v1 (InstDisc's)
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
    ], photometric=[
        common.RandomGrayscale(p=0.2),
        common.ColorJitter(0.4, 0.4, 0.4, 0.4),
    ])])


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
        s, (n, c, h, w) = self.num_splits, x.shape
        # (n, c, h, w) -> (n/s, s, c, h, w): group j holds the samples i with i % s == j. A view in any memory layout,
        # so a channels_last input is normalised where it lies (the official reshape to (n/s, s*c, h, w) copies it)
        xs = x.unflatten(0, (n // s, s))
        var, mean = torch.var_mean(xs, dim=(0, 3, 4), correction=0)  # (s, c) each, the batch statistics
        scale = self.weight * (var.float() + self.eps).rsqrt()
        shift = self.bias - mean.float() * scale
        with torch.no_grad():  # each group updates its copy of the running statistics: average them
            count = n // s * h * w
            self.running_mean.lerp_(mean.float().mean(0), self.momentum)
            self.running_var.lerp_(var.float().mean(0) * count / max(count - 1, 1), self.momentum)
        out = torch.addcmul(shift.to(x.dtype)[:, :, None, None], xs, scale.to(x.dtype)[:, :, None, None])
        return out.flatten(0, 1)


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

    @property
    def trunk(self):  # f_q without its head: what the probes read and backbone.pth holds
        return self.encoder_q.trunk

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.detach(), alpha=1 - self.m)  # theta_k <- m theta_k + (1-m) theta_q (Eq. 2)

    @torch.no_grad()
    def dequeue_and_enqueue(self, k):  # builder.py's _dequeue_and_enqueue, called by the loop
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
        rank, world_size = common.rank(), common.world()
        idx_this = idx_shuffle.view(world_size, -1)[rank]
        return x_all[idx_this], torch.argsort(idx_shuffle)  # channels_last or not: the conv weights' layout wins

    @torch.no_grad()
    def _batch_unshuffle(self, x, idx_unshuffle):
        rank, world_size = common.rank(), common.world()
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
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.moco_k % args.batch_size:  # whole batches enter the queue (the official assertion, moco#99)
        fit = args.moco_k // args.batch_size * args.batch_size
        common.fail(f"--moco-k {args.moco_k} is not divisible by --batch-size {args.batch_size}; use a multiple of "
                    f"{args.batch_size} such as {max(fit, args.batch_size)} or {fit + args.batch_size}, "
                    f"or a batch size that divides {args.moco_k}")
    split_bn = common.world() == 1 and args.bn_splits > 1
    if split_bn and args.batch_size % args.bn_splits:
        common.fail(f"--batch-size {args.batch_size} is not divisible by --bn-splits {args.bn_splits}; "
                    "pick a divisor of the batch size")
    augmentation = moco_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    # per-GPU BN under DDP, as official: SyncBN would let a key see its query's batch (moco#46)
    norm_layer = partial(SplitBatchNorm, num_splits=args.bn_splits) if split_bn else nn.BatchNorm2d
    model = MoCo(build_encoder(args, norm_layer), args.moco_dim, args.moco_k, args.moco_m).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:
        # every rank computes the same queue itself: broadcasting rank 0's buffers each step (DDP's default)
        # would resend K x C equal floats; evaluation and checkpoints use rank 0's BN statistics
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=learning_rate(0, args))

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
            im_q, im_k = augmentation.to_device(views, device)[0].chunk(2)  # colour ops, normalisation
            generator = common.step_generator(args.seed, run.global_step, device)  # the shuffle's permutation
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                q, k = ddp_model(im_q, im_k, generator)
            logits, labels = moco_logits(q, k, model.queue, args.moco_t)  # fp32, outside autocast
            loss = F.cross_entropy(logits, labels)
            model.dequeue_and_enqueue(k)  # after the logits: this batch's keys are negatives from the next step
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
