# DINO: Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in Self-Supervised Vision
# Transformers", ICCV 2021 (arXiv:2104.14294). Defaults follow facebookresearch/dino (main_dino.py, utils.py,
# vision_transformer.py).
#
#   torchrun --nproc_per_node=8 dino.py --data /imagenet                         # ViT-S/16, 100 epochs, batch 512
#   torchrun --nproc_per_node=8 dino.py --data /imagenet --epochs 300 --batch-size 1024 --teacher-temp 0.07 \
#       --warmup-teacher-temp-epochs 30 --no-norm-last-layer                   # the README's full ViT-S/16 run
#   torchrun --nproc_per_node=8 dino.py --data /imagenet --arch resnet50 --optimizer sgd --lr 0.03 --wd 1e-4 \
#       --wd-end 1e-4 --global-crops-scale 0.14 1 --local-crops-scale 0.05 0.14   # the README's ResNet-50 run
#   python dino.py --data /imagenet --batch-size 256                           # one 80 GB GPU: about 55 GiB (below)
#   python dino.py --dataset fashion-mnist --arch resnet-tiny --subset 10000 --epochs 5 --batch-size 64 --lr 0.002 \
#       --warmup-epochs 1 --momentum-teacher 0.99 --out-dim 1024 --local-crops-number 2 --baselines   # a quick CPU run
#       (--arch vit-tiny: the same on a ViT of 4 blocks, 7 x 7 patches of 4 px; docs/dino.md has both runs' figures)
#
# Published ImageNet results of ViT-S/16 (theirs, paper Table 2 and the README): 77.0 linear / 74.5 kNN for the
# released 800-epoch model; 74.0 / 69.3 for the default 100-epoch run above. Memory: ViT-S/16 keeps about 220 MiB an
# image (2 x 224 + 8 x 96 crops) for backward in bf16, counted on the CPU; 8 GPUs at batch 512 hold 64 images each.
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DINO pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official: 64 images per GPU on 8 GPUs, AdamW, lr 5e-4 per 256, 10 warm-up epochs, cosine to --min-lr
    common.add_common_args(p, "dino", arch="vit-small", epochs=100, batch_size=512, lr=5e-4, wd=0.04,
                           device_augment=True, arch_help="vit-small (ViT-S/16), vit-base (ViT-B/16), vit-tiny for "
                           "CPU runs, or a torchvision ResNet (resnet50, ...) / resnet-tiny",
                           wd_help="weight decay at the start, raised to --wd-end by a cosine (biases and norms: none)")
    # ALGO LOGIC: DINO hyper-parameters (main_dino.py's argparse)
    a = p.add_argument
    a("--optimizer", default="adamw", choices=["adamw", "sgd"], help="AdamW (ViT) or SGD momentum 0.9 (ResNet-50)")
    a("--wd-end", type=common.nonneg_float, default=0.4, help="weight decay at the end of the cosine")
    a("--min-lr", type=common.nonneg_float, default=1e-6, help="lr at the end of the cosine")
    a("--warmup-epochs", type=common.nonneg_int, default=10, help="linear lr warm-up from 0")
    a("--momentum-teacher", type=common.unit_float, default=0.996, help="teacher EMA momentum, raised to 1 by a cosine")
    a("--out-dim", type=common.positive_int, default=65536, help="outputs of the head (K)")
    a("--hidden-dim", type=common.positive_int, default=2048, help="hidden width of the head's MLP")
    a("--bottleneck-dim", type=common.positive_int, default=256, help="the MLP's output, before the last layer")
    a("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
      help="keep the weight-normalised last layer's norms at 1 (the README's full ViT-S run: --no-norm-last-layer)")
    a("--warmup-teacher-temp", type=common.positive_float, default=0.04, help="teacher temperature at epoch 0")
    a("--teacher-temp", type=common.positive_float, default=0.04, help="teacher temperature after the warm-up")
    a("--warmup-teacher-temp-epochs", type=common.nonneg_int, default=0, help="epochs of the temperature's warm-up")
    a("--student-temp", type=common.positive_float, default=0.1, help="student temperature")
    a("--center-momentum", type=common.unit_float, default=0.9, help="EMA momentum of the centre")
    a("--clip-grad", type=common.nonneg_float, default=3.0, help="each parameter's gradient clipped to this norm (0: off)")
    a("--freeze-last-layer", type=common.nonneg_int, default=1, help="epochs the last layer gets no gradient")
    a("--drop-path", type=common.unit_float, default=0.1, help="stochastic depth rate of the student ViT's last block")
    a("--global-crops-scale", type=common.unit_float, nargs=2, default=[0.4, 1.0], help="area range of the 2 global crops")
    a("--local-crops-number", type=common.nonneg_int, default=8, help="local crops per image")
    a("--local-crops-scale", type=common.unit_float, nargs=2, default=[0.05, 0.4], help="area range of the local crops")
    a("--local-crops-size", type=common.nonneg_int, default=0,
      help="side of the local crops (0: 96 at 224, in proportion otherwise, a multiple of the ViT's patch)")
    args = common.parse(p, argv)
    patch = common.VIT[args.arch][0] if args.arch in common.VIT else 1
    if not args.local_crops_size:
        args.local_crops_size = max(patch, round(args.image_size * 96 / 224 / patch) * patch)
    if args.local_crops_number and args.local_crops_size % patch:
        common.fail(f"--local-crops-size {args.local_crops_size} is not a multiple of {args.arch}'s patch size {patch}")
    if args.local_crops_number and args.local_crops_size > args.image_size:
        common.fail(f"--local-crops-size {args.local_crops_size} is larger than the global crops' --image-size "
                    f"{args.image_size}; local crops are the small ones")
    for name in ("global_crops_scale", "local_crops_scale"):
        if not 0 < getattr(args, name)[0] <= getattr(args, name)[1]:
            common.fail(f"--{name.replace('_', '-')} {' '.join(map(str, getattr(args, name)))}: give min <= max, min > 0")
    return args


# ALGO LOGIC: augmentations (paper Sec. 3.1 and Appendix, main_dino.py DataAugmentationDINO): flip and colour jitter
# for every crop; two global crops (bicubic, scale 0.4-1), the first always blurred, the second seldom blurred and
# sometimes solarized; N local crops (96 px at 224, scale 0.05-0.4), blurred half the time. A group per kind of crop
def dino_augmentation(args):
    crop = lambda size, scale: [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
                                T.RandomHorizontalFlip()]
    colour = [common.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), common.RandomGrayscale(p=0.2)]
    # official blur: PIL's radius (sigma) 0.1-2, untruncated; 13 taps hold +-3 sigma of the largest. None at <= 64 px,
    # as SimCLR's CIFAR recipe (a deviation where it applies)
    blur = lambda p: [] if args.image_size <= 64 else [common.GaussianBlur(13, sigma=(0.1, 2.0), p=p)]
    groups = [common.Views(1, crop(args.image_size, args.global_crops_scale), [*colour, *blur(1.0)]),
              common.Views(1, crop(args.image_size, args.global_crops_scale), [*colour, *blur(0.1), common.Solarize(0.2)])]
    if args.local_crops_number:
        groups.append(common.Views(args.local_crops_number, crop(args.local_crops_size, args.local_crops_scale),
                                   [*colour, *blur(0.5)]))
    return common.Augmentation(args.dataset, args.device_augment, groups)


# ALGO LOGIC: model. Student and teacher: a trunk (its class token, or a ResNet's pooled features) and the DINO head
class DINOHead(nn.Module):
    """vision_transformer.py DINOHead: 3-layer MLP (GELU, no BN), L2 normalisation, weight-normalised last layer."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp[::2]:  # _init_weights: truncated normal, std 0.02, zero bias
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        # w = g v / |v| per output (torch's weight_norm); v keeps nn.Linear's init (the official init runs before it)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1)
        g.requires_grad = not norm_last_layer  # norm_last_layer: each output's weight vector stays of norm 1

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def vit_init(trunk):
    """vision_transformer.py _init_weights on torchvision's ViT: linear weights (the attention's in-projection too)
    and the class and position tokens truncated normal with std 0.02, biases 0, LayerNorms 1 and 0; the patch
    projection a conv with torch's default init (official PatchEmbed)."""
    for name, p in trunk.named_parameters():
        if name.endswith("bias") or (p.ndim == 1 and "ln" in name):
            nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
        elif not name.startswith("conv_proj"):
            nn.init.trunc_normal_(p, std=0.02)
    trunk.conv_proj.reset_parameters()


class Network(nn.Module):
    """utils.py MultiCropWrapper: the trunk once per crop size, the head once on all crops."""

    def __init__(self, args, drop_path):
        super().__init__()
        self.trunk, width = common.build_backbone(args.arch, args.image_size, vit=True, drop_path=drop_path)
        if isinstance(self.trunk, common.ViT):
            vit_init(self.trunk)
        self.head = DINOHead(width, args.out_dim, args.hidden_dim, args.bottleneck_dim, args.norm_last_layer)

    def forward(self, crops):
        return self.head(common.multi_crop(self.trunk, crops))


class DINO(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.student = Network(args, args.drop_path)
        self.teacher = Network(args, 0.0).requires_grad_(False)  # no drop path (main_dino.py builds it without)
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as the student
        self.ncrops, self.student_temp, self.center_momentum = 2 + args.local_crops_number, args.student_temp, args.center_momentum
        self.register_buffer("center", torch.zeros(1, args.out_dim))  # in the checkpoint: exact resume

    @property
    def trunk(self):  # the teacher's trunk: what the official evaluation reads (eval_knn.py's checkpoint_key "teacher")
        return self.teacher.trunk

    def forward(self, crops, teacher_temp):
        """crops: the 2 global batches, then the local ones (view-major) -> the loss of this rank's samples."""
        with torch.no_grad():  # the teacher sees the global crops only, in training mode, without gradient
            t = self.teacher(crops[:2])
        s = self.student(crops)
        loss = dino_loss(s.float(), t.float(), self.center, teacher_temp, self.student_temp, self.ncrops)
        self.update_center(t.float())  # after the loss: this step uses the centre of the steps before (as official)
        return loss

    @torch.no_grad()
    def update_center(self, t):
        """DINOLoss.update_center: an EMA of the teacher outputs' batch mean over all ranks (all-reduced)."""
        batch_center = common.all_reduce(t.sum(0, keepdim=True)) / (len(t) * common.world())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def update_teacher(self, m):
        """teacher <- m teacher + (1 - m) student over all parameters (the frozen g too); buffers stay the teacher's."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()), 1 - m)


# ALGO LOGIC: loss (Eq. 1 and Algorithm 1, main_dino.py DINOLoss): the teacher's outputs on the 2 global crops,
# centred and sharpened (softmax at the teacher temperature), against the student's log-softmax at 0.1 on every
# crop but the same view, the cross-entropies averaged over the pairs (2 x ncrops - 2)
def dino_loss(s, t, center, teacher_temp, student_temp, ncrops):
    log_p = F.log_softmax(s / student_temp, dim=-1).chunk(ncrops)  # once per crop (official: once per pair)
    q = F.softmax((t - center) / teacher_temp, dim=-1).detach().chunk(2)
    terms = [-(q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    return sum(terms) / len(terms)


def teacher_temperature(epoch, args):
    """np.linspace(--warmup-teacher-temp, --teacher-temp, W)[epoch] for the W warm-up epochs, then --teacher-temp."""
    return common.cosine_schedule(epoch, args.epochs, args.warmup_teacher_temp_epochs, args.teacher_temp,
                                  args.teacher_temp, start=args.warmup_teacher_temp)


def clip_gradients(model, clip):
    """utils.clip_gradients: each parameter's gradient scaled to norm <= clip on its own, clip / (norm + 1e-6) when
    below 1 (not torch's clip_grad_norm_, which scales all gradients by their global norm)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, [(clip / (n + 1e-6)).clamp(max=1.0) for n in torch._foreach_norm(grads)])


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    augmentation = dino_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = DINO(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # a ResNet's BN in student and teacher synchronised (main_dino.py); a ViT has none
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # utils.get_params_groups: biases and norms (1-d) without weight decay; the scheduled decay goes to group 0 only
    trained = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if not (n.endswith(".bias") or p.ndim == 1)]},
              {"params": [p for n, p in trained if n.endswith(".bias") or p.ndim == 1], "weight_decay": 0.0}]
    optimizer = (torch.optim.AdamW(groups, lr=0.0) if args.optimizer == "adamw" else
                 torch.optim.SGD(groups, lr=0.0, momentum=0.9))

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average: the student's gradients; the centre is all-reduced)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    peak_lr = args.lr * args.batch_size / 256  # main_dino.py: lr * batch_size_per_gpu * world_size / 256
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr)

    # ALGO LOGIC: training loop (main_dino.py train_one_epoch)
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            k = run.global_step  # utils.cosine_scheduler per step: lr (with warm-up), weight decay, teacher momentum
            lr = common.cosine_schedule(k, total_steps, warmup_steps, peak_lr, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = common.cosine_schedule(k, total_steps, 0, args.wd, args.wd_end)
            crops = augmentation.to_device(views, device)  # a batch per group: global 1, global 2, the local crops
            if isinstance(model.student.trunk, common.ViT):  # drop path from the step's own draws: exact resume
                model.student.trunk.draw_from(common.step_generator((args.seed, common.rank()), k, device))
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # bf16 (official: fp16 with a GradScaler): a deviation
                loss = ddp_model(crops, teacher_temperature(epoch, args))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                clip_gradients(model.student, args.clip_grad)
            if epoch < args.freeze_last_layer:  # cancel_gradients_last_layer: AdamW then skips it, decay included
                for p in model.student.head.last_layer.parameters():
                    p.grad = None
            optimizer.step()
            model.update_teacher(common.cosine_schedule(k, total_steps, 0, args.momentum_teacher, 1.0))
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
