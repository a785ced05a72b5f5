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
# Deviation from the paper, as the official code: no proximal term (Sec. 3.3, Eq. 8-9) by default; its author holds
#   that the bank's momentum update (--nce-m) plays its role (lemniscate.pytorch issue #11). --proximal LAMBDA adds it.
import argparse
import functools
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Instance discrimination pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official main.py: resnet18, 200 epochs, lr 0.03 at batch 256, weight decay 1e-4
    common.add_common_args(p, "instdisc", arch="resnet18", epochs=200, batch_size=256, lr=0.03, wd=1e-4,
                           device_augment=True)
    # ALGO LOGIC: instance discrimination hyper-parameters (official main.py)
    p.add_argument("--momentum", type=common.unit_float, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[120, 160], help="epochs where lr drops x0.1")
    p.add_argument("--low-dim", type=common.positive_int, default=128, help="feature dimension of v and the bank")
    p.add_argument("--nce-k", type=common.nonneg_int, default=4096, help="noise samples per image (0: full softmax, Eq. 2)")
    p.add_argument("--nce-t", type=common.positive_float, default=0.07, help="temperature tau")
    p.add_argument("--nce-m", type=common.unit_float, default=0.5, help="momentum of the memory bank update")
    p.add_argument("--proximal", type=common.nonneg_float, default=0.0,
                   help="lambda of Sec. 3.3's proximal term (0: off, as the official code; no paper value is "
                        "quoted: docs/instdisc.md)")
    args = common.parse(p, argv)
    return args


# ALGO LOGIC: augmentation, one view per image, as the official main.py; the workers crop and flip, the colour ops
# run batched on the device (common.Augmentation; the flip commutes with them)
def instdisc_augmentation(args):
    return common.Augmentation(args.dataset, args.device_augment, [common.Views(1, geometry=[
        T.RandomResizedCrop(args.image_size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
    ], photometric=[
        common.RandomGrayscale(p=0.2),
        common.ColorJitter(0.4, 0.4, 0.4, 0.4),
    ])])


# ALGO LOGIC: model and memory bank (Sec. 3.1)
class InstDisc(nn.Module):
    """v = normalize(fc(trunk(x))), plus the memory bank: one vector per training image, and the NCE
    normaliser Z. Bank and Z are buffers, so checkpoints hold them."""

    def __init__(self, arch, image_size, num_images, low_dim=128):
        super().__init__()
        self.trunk, width = common.build_backbone(arch, image_size)
        self.fc = nn.Linear(width, low_dim)
        # official init: uniform in [-s, s], s = 1/sqrt(D/3), so each row has norm ~1 (not normalised)
        stdv = 1 / (low_dim / 3) ** 0.5
        self.register_buffer("memory", torch.rand(num_images, low_dim) * 2 * stdv - stdv)
        self.register_buffer("Z", torch.tensor(-1.0))  # < 0: not estimated yet
        self.Z_known = None  # host copy of "Z > 0", read once, so no step syncs to check it

    def forward(self, x):
        return F.normalize(self.fc(self.trunk(x)).float(), dim=1)

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
            self.Z.copy_(common.all_reduce(exp_scores.mean(), "mean") * len(self.memory))
            self.Z_known = True
        return self.Z


def draw_noise(y, n, K, generator):
    """Indices (b, 1+K): column 0 the image's own index, then K noise indices drawn uniformly from the n bank
    rows (P_n = 1/n), with replacement, as the official sampler. Drawn for the GLOBAL batch with the step
    generator and this rank's rows kept: any world size draws the same noise, and --resume is exact."""
    rank, world_size = common.rank(), common.world()
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


def proximal_term(v, previous):
    """Sec. 3.3, Eq. 8: ||v_i^(t) - v_i^(t-1)||^2, the current feature against its bank row from before this step's
    update, averaged over the batch as the loss (Eq. 9's expectation over P_d). Under DDP each rank takes its own
    samples' rows of the identical bank, so the ranks' mean gradient is one process's on the global batch."""
    return (v - previous).pow(2).sum(1).mean()


def instdisc_loss(model, v, y, args, generator):
    """The step's loss on v (b, D) of images y: NCE with noise from the bank (--nce-k 0: the softmax), in fp32
    outside autocast, plus lambda x the proximal term with --proximal."""
    n = len(model.memory)
    if args.nce_k:
        idx = draw_noise(y, n, args.nce_k, generator)
        exp_scores = torch.exp(torch.einsum("bkd,bd->bk", model.memory[idx], v) / args.nce_t)  # (b, 1+K)
        loss = nce_loss(exp_scores / model.normaliser(exp_scores), n)
    else:
        loss = softmax_loss(v, model.memory, y, args.nce_t)
    if args.proximal:  # the official code leaves it out (see the header)
        loss = loss + args.proximal * proximal_term(v, model.memory[y])
    return loss


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
    # the tightest rank decides for all, so no rank waits for one that stopped
    free = common.all_reduce(torch.tensor(float(free), device=device), "min").item()
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
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    augmentation = instdisc_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    num_images = len(pretrain_set)  # one bank row per training image; the pipeline yields each image's index
    check_bank_fits(num_images, args.low_dim, device)
    model = InstDisc(args.arch, args.image_size, num_images, args.low_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    # the paper's kNN on the memory bank, once the bank holds trained rows (not at random init or from a backbone.pth)
    paper_knn = functools.partial(bank_knn, model, common.dataset_labels(pretrain_set), run.probe_loaders[1], device,
                                  args) if run.resumed or not args.eval_only else None
    if args.eval_only:
        return run.final_evaluation(paper_knn)
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:
        # per-GPU BN as the official code; the bank is kept equal by update_memory, so DDP must not
        # broadcast rank 0's buffers every step (that would resend the whole bank)
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr=learning_rate(0, args))

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
            (x,), y = augmentation.to_device(view, device), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                v = ddp_model(x)  # (b, D) unit vectors, fp32
            loss = instdisc_loss(model, v, y, args, common.step_generator(args.seed, run.global_step, device))
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
