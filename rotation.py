# RotNet: Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image Rotations",
# ICLR 2018 (arXiv:1803.07728). Defaults follow gidariss/FeatureLearningRotNet (config/ImageNet_RotNet_*.py).
#
#   python rotation.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 rotation.py --data /imagenet              # 8 GPUs
#
# ImageNet defaults are what the official config RUNS: its optimizer says lr 0.1, but LUT_lr sets the lr from
# epoch 0 on, so training starts at 0.01 (batch 192) and drops x0.1 at epochs 15, 30, 45 of 50. (The paper,
# Sec. 3.2: lr 0.01, /10 after epochs 10 and 20 of 30.)
# CIFAR-10 recipe of config/CIFAR10_RotNet_NIN4blocks.py (batch 128 at lr 0.1, x0.2 at 60/120/160 of 200):
#   python rotation.py --dataset cifar10 --data ./data --arch resnet18 --batch-size 128 --lr 0.2 --epochs 200
#       --schedule 60 120 160 --lr-decay 0.2
# Short runs (benchmarks/run.py): that CIFAR recipe's lr (--batch-size 128 --lr 0.2) with no drops (--schedule).
# --batch-size counts IMAGES: each one enters the batch four times (4B samples), and the lr is not rescaled
# for that, as the official code. The probe reads the trunk's last pooled layer on the whole, unrotated image.
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RotNet pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official ImageNet config: 50 epochs, batch 192 images (x4 rotations), lr 0.01 at batch 192 (its LUT_lr) = 0.01333
    # per 256 images, weight decay 5e-4
    common.add_common_args(p, "rotation", arch="resnet50", epochs=50, batch_size=192, lr=0.01 * 256 / 192,
                           wd=5e-4)
    # ALGO LOGIC: RotNet hyper-parameters (official ImageNet config: SGD Nesterov, momentum 0.9)
    p.add_argument("--momentum", type=common.unit_float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[15, 30, 45], help="epochs where lr drops x--lr-decay")
    p.add_argument("--lr-decay", type=common.unit_float, default=0.1, help="lr factor at each --schedule milestone (CIFAR: 0.2)")
    args = common.parse(p, argv)
    return args


# ALGO LOGIC: augmentation. A square crop and a flip (official dataloader.py); the rotations come on the device
def rotation_augmentation(args):
    size = args.image_size
    if args.dataset in ("cifar10", "cifar100", "fashion-mnist"):  # small whole images, as official CIFAR:
        crop = [T.Resize(size), T.RandomCrop(size, padding=size // 8)]  # 4 px zero padding at 32, scaled
    else:  # official ImageNet config (random_sized_crop): a random-sized crop, square, torchvision's defaults
        crop = [T.RandomResizedCrop(size)]
    return common.Augmentation(args.dataset, groups=[common.Views(1, [*crop, T.RandomHorizontalFlip()])])  # uint8 out


def rotate_batch(x):
    """(B, C, S, S) -> (4B, C, S, S) and labels (4B,): each image rotated by 0, 90, 180 and 270 degrees
    counter-clockwise (label k = k quarter turns), its four copies adjacent as the official loader.
    torch.rot90 permutes pixels: no interpolation, so no artefact tells the rotations apart (Sec. 2.2)."""
    rotated = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], dim=1)  # (B, 4, C, S, S)
    labels = torch.arange(4, device=x.device).repeat(len(x))  # 0 1 2 3 0 1 2 3 ...
    return rotated.flatten(0, 1), labels


# ALGO LOGIC: model. The trunk and a 4-way linear classifier of the rotation
class RotNet(nn.Module):
    def __init__(self, arch, image_size):
        super().__init__()
        self.trunk, width = common.build_backbone(arch, image_size)
        self.classifier = nn.Linear(width, 4)

    def forward(self, x):
        return self.classifier(self.trunk(x))


def learning_rate(epoch, args):
    """Per epoch as the official LUT_lr: x--lr-decay at each --schedule milestone."""
    lr = args.lr * args.batch_size / 256  # --lr is per 256 images (not per rotated sample)
    return lr * args.lr_decay ** sum(epoch >= milestone for milestone in args.schedule)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    augmentation = rotation_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = RotNet(args.arch, args.image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # official: SGD with Nesterov momentum, weight decay on every parameter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd,
                                nesterov=args.momentum > 0)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:  # per-GPU BN over that GPU's 4b rotated samples, as the official single-GPU batch
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
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
        for step, (view, _, _) in enumerate(loader, start=sampler.start_step):
            # all four rotations of an image in the same batch (Sec. 3.1, implementation details), one BN batch
            x, rotation = rotate_batch(augmentation.to_device(view, device)[0])  # (4b, C, S, S), (4b,)
            if device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = ddp_model(x)
            loss = F.cross_entropy(logits.float(), rotation)  # mean over the 4b samples
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
