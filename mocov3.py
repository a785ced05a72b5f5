# MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021
# (arXiv:2104.02057). Defaults follow facebookresearch/moco-v3 (main_moco.py, moco/builder.py, moco/optimizer.py,
# vits.py) and its CONFIG.md recipes: ViT (AdamW) by default, ResNet-50 (LARS) when --arch is a ResNet.
#
#   torchrun --nproc_per_node=8 mocov3.py --data /imagenet                  # ViT-S/16, 300 epochs, batch 4096
#   torchrun --nproc_per_node=8 mocov3.py --data /imagenet --arch vit-base  # ViT-B/16, the same recipe
#   torchrun --nproc_per_node=8 mocov3.py --data /imagenet --arch resnet50 --epochs 100   # R-50, LARS, lr 0.6
#   python mocov3.py --data /imagenet --batch-size 1024                     # ViT-S/16 on one 80 GB GPU (below)
#   python mocov3.py --dataset fashion-mnist --arch vit-tiny --subset 10000 --epochs 5 --batch-size 256 --lr 1e-3 \
#       --warmup-epochs 1 --moco-mlp-dim 1024 --baselines                          # a quick CPU run (docs/mocov3.md)
#
# Published ImageNet linear top-1 (theirs, CONFIG.md, batch 4096): ViT-S/16 73.2, ViT-B/16 76.7 (300 epochs);
# fine-tuned with DeiT's recipe 81.4 / 83.2. ResNet-50: 68.9 (100 epochs), 72.8 (300), 74.6 (1000: --lr 0.3
# --wd 1.5e-6 --moco-m 0.996). Memory: ViT-S/16 keeps about 63 MiB an image (two views through the base encoder)
# for backward in bf16, counted on the CPU with the attention matrices: 1024 images take about 63 GiB of an 80 GB
# GPU, 512 a GPU on 8 GPUs about 32 GiB.
import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v3 pretraining + kNN / linear evaluation")
    by_trunk = "; default: CONFIG.md's recipe for the trunk"
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official (CONFIG.md): batch 4096; ViTs: AdamW at 1.5e-4 per 256, wd 0.1; ResNet-50: LARS at 0.6 (100 epochs) or
    # 0.3 (300 and more), wd 1e-6
    common.add_common_args(p, "mocov3", arch="vit-small", epochs=300, batch_size=4096, lr=None, wd=None,
                           device_augment=True, arch_help="vit-small (ViT-S/16 of 12 heads), vit-base "
                           "(ViT-B/16), vit-tiny for CPU runs, or a torchvision ResNet (resnet50, ...) / resnet-tiny",
                           lr_help="base lr per 256 images; peak = lr * batch / 256" + by_trunk + " (ViT 1.5e-4, "
                           "ResNet 0.6 below 300 epochs, else 0.3)",
                           wd_help="weight decay (AdamW: every parameter; LARS: biases and norms excluded)" + by_trunk +
                           " (ViT 0.1, ResNet 1e-6)")
    # ALGO LOGIC: MoCo v3 hyper-parameters (main_moco.py's argparse)
    a = p.add_argument
    a("--optimizer", default=None, choices=["adamw", "lars"], help="default: adamw for a ViT, lars for a ResNet")
    a("--moco-dim", type=common.positive_int, default=256, help="output width of projector and predictor")
    a("--moco-mlp-dim", type=common.positive_int, default=4096, help="hidden width of projector and predictor")
    a("--moco-m", type=common.unit_float, default=0.99, help="momentum of the key encoder's EMA")
    a("--moco-m-cos", action=argparse.BooleanOptionalAction, default=True,
      help="raise the momentum to 1 by a cosine over the steps (every CONFIG.md recipe)")
    a("--moco-t", type=common.positive_float, default=None, help="softmax temperature" + by_trunk + " (ViT 0.2, ResNet 1.0)")
    a("--warmup-epochs", type=common.nonneg_float, default=None, help="linear lr warm-up from 0" + by_trunk +
      " (ViT 40, ResNet 10)")
    a("--crop-min", type=common.unit_float, default=None, help="smallest area of the random resized crops" + by_trunk +
      " (ViT 0.08, ResNet 0.2)")
    a("--stop-grad-conv1", action=argparse.BooleanOptionalAction, default=True,
      help="ViT: a frozen random patch projection (Sec. 4.2's stability trick)")
    args = common.parse(p, argv)
    vit = args.arch in common.VIT
    recipe = (dict(optimizer="adamw", lr=1.5e-4, wd=0.1, moco_t=0.2, warmup_epochs=40, crop_min=0.08) if vit else
              dict(optimizer="lars", lr=0.6 if args.epochs < 300 else 0.3, wd=1e-6, moco_t=1.0, warmup_epochs=10,
                   crop_min=0.2))
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if vit:
        patch, width = common.VIT[args.arch][:2]
        if args.image_size % patch:
            common.fail(f"--image-size {args.image_size} is not a multiple of {args.arch}'s patch size {patch}")
        if width % 4:
            common.fail(f"--arch {args.arch}: the 2-d sin-cos position embedding needs a width that is a multiple of 4")
    return args


# ALGO LOGIC: augmentations (main_moco.py, BYOL's recipe): the same crop, flip, colour jitter and grey for both views;
# the first view always blurred, the second seldom blurred and sometimes solarized (a group each)
def mocov3_augmentation(args):
    geometry = [T.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0)), T.RandomHorizontalFlip()]
    colour = [common.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), common.RandomGrayscale(p=0.2)]
    # official blur: PIL's radius (sigma) 0.1-2, untruncated; 13 taps hold +-3 sigma of the largest. None at <= 64 px,
    # as SimCLR's CIFAR recipe (a deviation where it applies)
    blur = lambda p: [] if args.image_size <= 64 else [common.GaussianBlur(13, sigma=(0.1, 2.0), p=p)]
    return common.Augmentation(args.dataset, args.device_augment, [
        common.Views(1, geometry, [*colour, *blur(1.0)]),
        common.Views(1, geometry, [*colour, *blur(0.1), common.Solarize(p=0.2)])])


# ALGO LOGIC: model (moco/builder.py, vits.py)
def sincos_position_embedding(dim, side, temperature=10000.0):
    """vits.py build_2d_sincos_position_embedding -> (1, 1 + side^2, dim): the class token's row zero; per patch
    (row-major) [sin(a w_i), cos(a w_i), sin(b w_i), cos(b w_i)] with w_i = temperature^(-i/(dim/4)), a its row
    and b its column (the official grid_w and grid_h of torch.meshgrid's "ij" indexing)."""
    a, b = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_a, out_b = a.flatten()[:, None] * omega, b.flatten()[:, None] * omega
    return torch.cat([torch.zeros(1, dim), torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], 1)])[None]


def mocov3_vit(args):
    """vits.py VisionTransformerMoCo on torchvision's ViT: a fixed 2-d sin-cos position embedding; the attention's
    q, k and v each xavier-uniform (sqrt(6 / 2d)), other Linear weights xavier-uniform, biases 0; the class token
    N(0, 1e-6); the patch projection uniform with xavier's bound over 3 p^2 inputs, bias 0, and with
    --stop-grad-conv1 frozen at that random init."""
    heads = 12 if args.arch == "vit-small" else None  # vits.py vit_small: 12 heads (DeiT's ViT-S has 6)
    trunk, width = common.build_backbone(args.arch, args.image_size, vit=True, heads=heads)
    trunk.encoder.pos_embedding.data.copy_(sincos_position_embedding(width, args.image_size // common.VIT[args.arch][0]))
    trunk.encoder.pos_embedding.requires_grad = False
    for m in trunk.modules():
        if isinstance(m, nn.MultiheadAttention):
            bound = (6.0 / (2 * width)) ** 0.5
            nn.init.uniform_(m.in_proj_weight, -bound, bound)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(trunk.class_token, std=1e-6)
    patch = trunk.conv_proj
    bound = (6.0 / (3 * patch.kernel_size[0] * patch.kernel_size[1] + width)) ** 0.5
    nn.init.uniform_(patch.weight, -bound, bound)
    nn.init.zeros_(patch.bias)
    patch.requires_grad_(not args.stop_grad_conv1)
    return trunk, width, {"heads": heads} if heads else {}


def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """builder.py _build_mlp: bias-free Linears, BN + ReLU between them, and a BN without affine after the last."""
    layers = []
    for i in range(num_layers):
        layers.append(nn.Linear(input_dim if i == 0 else mlp_dim, output_dim if i == num_layers - 1 else mlp_dim, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True)]
        elif last_bn:  # as SimCLR's projector, without its affine scale
            layers.append(nn.BatchNorm1d(output_dim, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, trunk, projector):
        super().__init__()
        self.trunk, self.projector = trunk, projector

    def forward(self, x):
        return self.projector(self.trunk(x))


class MoCoV3(nn.Module):
    """builder.py MoCo_ViT / MoCo_ResNet: base encoder (trunk + projector) and predictor; a momentum encoder, the
    base encoder's copy, updated by EMA. ViT: a 3-layer projector and a predictor with its last BN; ResNet: a
    2-layer projector, the predictor without it."""

    def __init__(self, args):
        super().__init__()
        vit = args.arch in common.VIT
        if vit:
            trunk, width, self.trunk_recipe = mocov3_vit(args)
        else:  # main_moco.py: torchvision's ResNet with zero_init_residual
            (trunk, width), self.trunk_recipe = common.build_backbone(args.arch, args.image_size, zero_init_residual=True), {}
        self.base = Encoder(trunk, build_mlp(3 if vit else 2, width, args.moco_mlp_dim, args.moco_dim))
        self.predictor = build_mlp(2, args.moco_dim, args.moco_mlp_dim, args.moco_dim, last_bn=vit)
        self.momentum = copy.deepcopy(self.base).requires_grad_(False)  # starts as the base encoder (official copy_)
        self.T = args.moco_t

    @property
    def trunk(self):  # what the official linear evaluation reads (main_lincls.py: base_encoder)
        return self.base.trunk

    @torch.no_grad()
    def update_momentum(self, m):
        """_update_momentum_encoder: momentum <- m momentum + (1 - m) base, parameters only (BN buffers their own)."""
        torch._foreach_lerp_(list(self.momentum.parameters()), list(self.base.parameters()), 1 - m)

    def forward(self, x1, x2):
        """Each view through the base encoder and predictor (queries) and the momentum encoder (keys); the symmetric
        loss. The caller updates the momentum encoder first (official: after the queries, before the keys)."""
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        with torch.no_grad():
            k1, k2 = self.momentum(x1), self.momentum(x2)
        return contrastive_loss(q1.float(), k2.float(), self.T) + contrastive_loss(q2.float(), k1.float(), self.T)


# ALGO LOGIC: loss (paper Alg. 1, builder.py contrastive_loss): InfoNCE of each query against the keys of the whole
# global batch (gathered from every rank, no gradient), the positive the key of the same image in the other view
# (labels offset by the rank), scaled by 2T (Sec. 3's note: the gradient's scale does not depend on T)
def contrastive_loss(q, k, T):
    q, k = F.normalize(q, dim=1), common.gather(F.normalize(k, dim=1))  # gathered after normalising (the same)
    logits = q @ k.T / T
    labels = torch.arange(len(q), device=q.device) + len(q) * common.rank()
    return F.cross_entropy(logits, labels) * (2 * T)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.batch_size // common.world() < 2:  # the heads' BN over one sample is undefined
        common.fail(f"--batch-size {args.batch_size} leaves 1 image per rank; the heads' BN needs 2 or more")
    augmentation = mocov3_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = MoCoV3(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if common.world() > 1:  # main_moco.py: every BN synchronised (the projector's and predictor's; a ResNet's)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = [p for p in model.parameters() if p.requires_grad]  # not the momentum encoder, the fixed embeddings
    optimizer = (torch.optim.AdamW(trained, lr=0.0, weight_decay=args.wd) if args.optimizer == "adamw" else
                 common.LARS(common.lars_groups(model), lr=0.0, weight_decay=args.wd))  # moco/optimizer.py's LARS

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, trunk_recipe=model.trunk_recipe, model=model,
                     optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks share: the averaged gradients, the keys gathered in the loss)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256  # main_moco.py: lr * batch_size / 256
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr)

    # ALGO LOGIC: training loop (main_moco.py train)
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            k = run.global_step  # adjust_learning_rate and adjust_moco_momentum at the fractional epoch: per step
            lr = common.cosine_lr(k, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1, x2 = augmentation.to_device(views, device)
            model.update_momentum(common.cosine_momentum(k, total_steps, args.moco_m) if args.moco_m_cos else args.moco_m)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # bf16 (official: fp16 with a GradScaler): a deviation
                loss = ddp_model(x1, x2)
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
