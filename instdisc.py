# Instance Discrimination: Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance
# Discrimination", CVPR 2018 (arXiv:1805.01978). Defaults follow zhirongw/lemniscate.pytorch (main.py, lib/).
#
#   python instdisc.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 instdisc.py --data /imagenet              # 8 GPUs
#   torchrun --nproc_per_node=8 instdisc.py --data /imagenet --nce-k 0    # full softmax over the bank (Eq. 2)
#
# The memory bank holds one --low-dim vector per training image on EVERY rank: ImageNet's 1.28M x 128 fp32
# is 655 MB per GPU (a dataset whose bank does not fit stops before training, naming the size).
# CIFAR-10 recipe of the official cifar.py: --dataset cifar10 --arch resnet18 --batch-size 128 --lr 0.06
#   (= its lr 0.03 at batch 128) --wd 5e-4 --nce-t 0.1 --nce-k 0 (its README's command); its augmentation
#   has no flip, this file keeps the ImageNet list below.
# Short runs (benchmarks/run.py): that CIFAR recipe (--nce-k 0 --nce-t 0.1 --lr 0.06 at batch 128); NCE's K/n
#   on 10,000 images is far from ImageNet's 4096 / 1.28M.
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Instance discrimination pretraining + kNN / linear evaluation")
    # TRY NOT TO MODIFY: flags shared by every sslref method file
    p.add_argument("--dataset", default="imagefolder", choices=list(common.DEFAULT_IMAGE_SIZE), help="dataset kind")
    p.add_argument("--data", default="", help="dataset folder (imagefolder: DATA/train and DATA/val)")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet (official main.py default: resnet18)")
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
    p.add_argument("--out", default="runs/instdisc", help="output folder: metrics.jsonl, checkpoint.pth, backbone.pth")
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
    # ALGO LOGIC: instance discrimination hyper-parameters (official main.py)
    p.add_argument("--momentum", type=common.unit_float, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[120, 160], help="epochs where lr drops x0.1")
    p.add_argument("--low-dim", type=common.positive_int, default=128, help="feature dimension of v and the bank")
    p.add_argument("--nce-k", type=common.nonneg_int, default=4096, help="noise samples per image (0: full softmax, Eq. 2)")
    p.add_argument("--nce-t", type=common.positive_float, default=0.07, help="temperature tau")
    p.add_argument("--nce-m", type=common.unit_float, default=0.5, help="momentum of the memory bank update")
    args = p.parse_args(argv)
    args.image_size = args.image_size or common.DEFAULT_IMAGE_SIZE[args.dataset]
    return args


# ALGO LOGIC: augmentation, one view per image, as the official main.py; the workers crop and flip, the colour ops
# run batched on the device (common.Augmentation; the flip commutes with them)
def instdisc_augmentation(args):
    return common.Augmentation(args, geometry=[
        T.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
    ], photometric=[
        common.RandomGrayscale(p=0.2),
        common.ColorJitter(0.4, 0.4, 0.4, 0.4),
    ])


# ALGO LOGIC: model and memory bank (Sec. 3.1)
class InstDisc(nn.Module):
    """v = normalize(fc(trunk(x))), plus the memory bank: one vector per training image, and the NCE
    normaliser Z. Bank and Z are buffers, so checkpoints hold them."""

    def __init__(self, arch, image_size, num_images, low_dim=128):
        super().__init__()
        self.encoder, width = common.build_backbone(arch, image_size)
        self.fc = nn.Linear(width, low_dim)
        # official init: uniform in [-s, s], s = 1/sqrt(D/3), so each row has norm ~1 (not normalised)
        stdv = 1 / (low_dim / 3) ** 0.5
        self.register_buffer("memory", torch.rand(num_images, low_dim) * 2 * stdv - stdv)
        self.register_buffer("Z", torch.tensor(-1.0))  # < 0: not estimated yet
        self.Z_known = None  # host copy of "Z > 0", read once, so no step syncs to check it

    def forward(self, x):
        return F.normalize(self.fc(self.encoder(x)).float(), dim=1)

    @torch.no_grad()
    def update_memory(self, v, y, m):
        """Every rank writes the features of ALL ranks at their images' rows: v_i <- normalize(m v_i + (1-m) f_i)
        (official memory update, m = --nce-m), so the bank stays identical everywhere."""
        v, y = common.gather(v.detach()), common.gather(y)  # (N_batch, D), (N_batch,)
        self.memory[y] = F.normalize(m * self.memory[y] + (1 - m) * v, dim=1)

    @torch.no_grad()
    def normaliser(self, exp_scores):
        """Z (Sec. 3.2), estimated once from the first batch as the official code: n x the mean of exp(v.f / tau)
        over its positives and noise samples (all ranks' first batches), then kept fixed."""
        if self.Z_known is None:
            self.Z_known = bool(self.Z > 0)
        if not self.Z_known:
            self.Z.copy_(common.all_reduce_mean(exp_scores.mean()) * len(self.memory))
            self.Z_known = True
        return self.Z


def draw_noise(y, n, K, generator):
    """Indices (b, 1+K): column 0 the image's own index, then K noise indices drawn uniformly from the n bank
    rows (P_n = 1/n), with replacement, as the official sampler. Drawn for the GLOBAL batch with the step
    generator and this rank's rows kept: any world size draws the same noise, and --resume is exact."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if common.is_distributed() else (0, 1)
    b = len(y)
    idx = torch.randint(n, (world_size * b, K + 1), device=y.device, generator=generator)[rank * b:(rank + 1) * b]
    idx[:, 0] = y
    return idx


# ALGO LOGIC: losses
def nce_loss(P, n, eps=1e-7):
    """NCE (Eq. 6-7). P: (b, 1+K) = P(i|v) = exp(v_i.f / tau) / Z for the data sample (column 0) and K noise
    samples. h(i, v) = P / (P + K P_n) with P_n = 1/n; J = -log h(data) - sum_noise log(1 - h(noise)),
    summed over the batch and divided by b as the official NCECriterion (eps as its 1e-7)."""
    K = P.shape[1] - 1
    K_Pn = K / n
    log_h_data = torch.log(P[:, 0] / (P[:, 0] + K_Pn + eps))
    log_1_minus_h_noise = torch.log(K_Pn / (P[:, 1:] + K_Pn + eps))
    return -(log_h_data.sum() + log_1_minus_h_noise.sum()) / len(P)


def softmax_loss(v, memory, y, tau):
    """Non-parametric softmax (Eq. 2): P(i|v) = exp(v_i.v / tau) / sum_j exp(v_j.v / tau) over all n bank
    rows; -log P(y|v) averaged over the batch (the official LinearAverage + CrossEntropyLoss)."""
    return F.cross_entropy(v @ memory.T / tau, y)


def learning_rate(epoch, args):
    """Per epoch as the official adjust_learning_rate: x0.1 at each --schedule milestone (120, 160)."""
    return args.lr * args.batch_size / 256 * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def check_bank_fits(n, dim, device):
    """The bank is replicated on every rank: stop before training if it would take over half the free memory."""
    need = n * dim * 4
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "a GPU"
    else:
        free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    if common.is_distributed():  # the tightest rank decides for all, so no rank waits for one that stopped
        free_t = torch.tensor(float(free), device=device)
        dist.all_reduce(free_t, op=dist.ReduceOp.MIN)
        free = free_t.item()
    if need > free / 2:
        common.fail(f"the memory bank of {n} images x {dim} floats needs {need / 2**30:.1f} GiB, more than half of "
                    f"the {free / 2**30:.1f} GiB free on {where}; use --subset or a smaller --low-dim")


@torch.no_grad()
def bank_knn(model, bank_labels, probe_test_loader, device, args):
    """The paper's kNN (Sec. 3.4): the memory bank as the training features, the test images' v as queries.
    k and sigma from --knn-k 200 --knn-t 0.1 (official cifar.py: 0.1; its ImageNet main.py uses --nce-t 0.07)."""
    if (bank_labels < 0).any():  # STL-10's unlabelled images
        return {}
    test_v, test_y, _ = common.extract_features(model, probe_test_loader, device, args.amp)  # this rank's share
    r, w = common.rank(), common.world()  # and its share of the bank: rows r, r + w, ... (a view, not a copy)
    return {"knn_bank_top1": common.knn_classify(model.memory[r::w], bank_labels[r::w].to(device), test_v, test_y,
                                                 args.knn_k, args.knn_t)}


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeding, data
    args = parse_args(argv)
    rank, world_size, device = common.init_distributed()
    if args.batch_size % world_size:
        common.fail(f"--batch-size {args.batch_size} is not divisible by the world size {world_size}; "
                    f"use a multiple of {world_size}")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    common.seed_everything(args.seed)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    augmentation = instdisc_augmentation(args)
    pretrain_set, probe_train_set, probe_test_set = common.build_datasets(args, augmentation)
    probe_train_loader = common.eval_loader(probe_train_set, args, world_size, rank)
    probe_test_loader = common.eval_loader(probe_test_set, args, world_size, rank)

    num_images = len(pretrain_set)  # one bank row per training image; the pipeline yields each image's index
    check_bank_fits(num_images, args.low_dim, device)
    model = InstDisc(args.arch, args.image_size, num_images, args.low_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd)

    # TRY NOT TO MODIFY: resume, evaluation-only, DDP wrapper
    run = common.Run(args, model, optimizer, model.encoder, (probe_train_loader, probe_test_loader), device,
                     rank, world_size)
    bank_labels = common.dataset_labels(pretrain_set)

    def paper_knn():
        if args.eval_only and run.last_good is None:  # random init or a backbone.pth: there is no trained bank
            return {}
        return bank_knn(model, bank_labels, probe_test_loader, device, args)

    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation(paper_knn)
    loader, sampler = common.train_loader(pretrain_set, args, world_size, rank)
    ddp_model = model
    if world_size > 1:
        # per-GPU BN as the official code; the bank is kept equal by update_memory, so DDP must not
        # broadcast rank 0's buffers every step (that would resend the whole bank)
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step)

    # ALGO LOGIC: training loop
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        lr = learning_rate(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for step, (view, _, y) in enumerate(loader, start=sampler.start_step):  # y: the images' own indices
            x, y = augmentation.to_device(view, device), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                v = ddp_model(x)  # (b, D) unit vectors, fp32
            if args.nce_k:  # NCE with noise from the bank (fp32, outside autocast)
                idx = draw_noise(y, num_images, args.nce_k, common.step_generator(args.seed, run.global_step, device))
                exp_scores = torch.exp(torch.einsum("bkd,bd->bk", model.memory[idx], v) / args.nce_t)  # (b, 1+K)
                loss = nce_loss(exp_scores / model.normaliser(exp_scores), num_images)
            else:
                loss = softmax_loss(v, model.memory, y, args.nce_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.update_memory(v, y, args.nce_m)  # after the loss used the old rows
            if run.after_step(epoch, step, loss, lr):  # progress, checkpoints, monitor, divergence stop
                break

    # TRY NOT TO MODIFY: final evaluation and consistency check across ranks
    return run.final_evaluation(paper_knn)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
