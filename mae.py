# MAE: He, Chen, Xie, Li, Dollár, Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
# (arXiv:2111.06377). Defaults follow facebookresearch/mae (main_pretrain.py, models_mae.py, util/pos_embed.py) with
# PRETRAIN.md's command (800 epochs, batch 4096, base lr 1.5e-4, --norm-pix-loss).
#
#   torchrun --nproc_per_node=8 mae.py --data /imagenet --finetune-epochs 100   # ViT-B/16, batch 4096 (512 a GPU)
#   python mae.py --data /imagenet --batch-size 1024                            # one 80 GB GPU (below)
#   python mae.py --dataset fashion-mnist --arch vit-tiny --subset 10000 --epochs 13 --batch-size 256 --lr 1e-3 \
#       --warmup-epochs 1 --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 --baselines --finetune-epochs 5 \
#       --finetune-batch-size 128 --finetune-warmup-epochs 1 --finetune-lr 1e-3 --layer-decay 0.75 \
#       --finetune-mixup 0 --finetune-cutmix 0                                  # a quick CPU run (docs/mae.md)
#
# MAE is the descendant of the denoising autoencoder (denoising_autoencoder.py: corrupt the input, reconstruct it) and
# the context encoder (context_encoder.py: reconstruct a removed region): here the corruption is removing 75% of a
# ViT's patches, and the encoder never sees the removed ones. Published ImageNet top-1 of ViT-B/16 pretrained 1600
# epochs (theirs, the README and FINETUNE.md): 83.6 fine-tuned (100 epochs), 68.0 linear; its value shows under
# fine-tuning (--finetune-epochs), not under a frozen probe. Memory: ViT-B/16 with the 8-block decoder keeps about
# 46 MiB an image for backward in bf16 (counted on the CPU, attention matrices included): 1024 images take about
# 46 GiB, 512 a GPU on 8 GPUs about 23 GiB.
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MAE pretraining + kNN / linear / fine-tuning evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official (PRETRAIN.md): 4096 images, AdamW at 1.5e-4 per 256, 40 warm-up epochs, cosine to --min-lr
    common.add_common_args(p, "mae", arch="vit-base", epochs=800, batch_size=4096, lr=1.5e-4, wd=0.05,
                           arch_help="vit-base (ViT-B/16), vit-small (ViT-S/16) or vit-tiny for CPU runs",
                           wd_help="AdamW weight decay (biases and norms: none, as timm's add_weight_decay)")
    # ALGO LOGIC: MAE hyper-parameters (main_pretrain.py's argparse, models_mae.py's decoder)
    a = p.add_argument
    a("--mask-ratio", type=float, default=0.75, help="fraction of each image's patches removed")
    a("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
      help="targets are each patch's pixels normalised by their own mean and std (the reported numbers' setting)")
    a("--decoder-dim", type=common.positive_int, default=512, help="decoder width")
    a("--decoder-depth", type=common.positive_int, default=8, help="decoder blocks")
    a("--decoder-heads", type=common.positive_int, default=16, help="decoder attention heads")
    a("--warmup-epochs", type=common.nonneg_float, default=40, help="linear lr warm-up from 0")
    a("--min-lr", type=common.nonneg_float, default=0.0, help="lr at the end of the cosine")
    a("--crop-min", type=common.unit_float, default=0.2, help="smallest area of the random resized crop")
    args = common.parse(p, argv)
    if args.arch not in common.VIT:
        common.fail(f"--arch {args.arch}: MAE removes a ViT's patches; use vit-base, vit-small or vit-tiny")
    if not 0 < args.mask_ratio < 1:
        common.fail(f"--mask-ratio {args.mask_ratio} leaves nothing to see or nothing to predict; use a value in "
                    "(0, 1), e.g. 0.75")
    patch, width, depth, heads, _ = common.VIT[args.arch]
    if args.image_size % patch:
        common.fail(f"--image-size {args.image_size} is not a multiple of {args.arch}'s patch size {patch}")
    if int((args.image_size // patch) ** 2 * (1 - args.mask_ratio)) == 0:
        common.fail(f"--mask-ratio {args.mask_ratio} keeps no patch of the {(args.image_size // patch) ** 2}; lower it")
    for name, dim, h in (("--arch", width, heads), ("--decoder-dim", args.decoder_dim, args.decoder_heads)):
        if dim % 4 or dim % h:  # the 2-d sin-cos embedding splits the width in 4; attention splits it over the heads
            common.fail(f"{name}: width {dim} must be a multiple of 4 and of its {h} heads")
    return args


# ALGO LOGIC: augmentations (paper Sec. 4, main_pretrain.py): a bicubic random resized crop from 20% of the area, a
# flip; no colour ops
def mae_augmentation(args):
    return common.Augmentation(args.dataset, False, [common.Views(1, [
        T.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip()])])


# ALGO LOGIC: model (models_mae.py MaskedAutoencoderViT): the trunk is common.ViT (torchvision's blocks, timm's layout)
def sincos_position_embedding(dim, side):
    """util/pos_embed.py get_2d_sincos_pos_embed(dim, side, cls_token=True) -> (1, 1 + side^2, dim): the class token's
    row zero; then per patch (row-major) the first dim/2 channels encode its column and the last dim/2 its row (the
    official grid[0] and grid[1] of np.meshgrid(w, h)), each as [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i/(dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                              indexing="ij")
    one = lambda pos: torch.cat([(pos.flatten()[:, None] * omega).sin(), (pos.flatten()[:, None] * omega).cos()], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([one(col), one(row)], 1)])[None].float()


def patchify(imgs, p):
    """(N, 3, H, W) -> (N, L, p * p * 3): patches row-major, each patch's pixels row-major, channels last."""
    N, C, H, W = imgs.shape
    return imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(N, (H // p) * (W // p), p * p * C)


def unpatchify(x, p):
    """(N, L, p * p * 3) -> (N, 3, H, W), the inverse of patchify for square images."""
    N, L, _ = x.shape
    h = int(L ** 0.5)
    return x.reshape(N, h, h, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(N, 3, h * p, h * p)


def random_masking(x, mask_ratio, noise):
    """Per-sample random masking by sorting noise (N, L): the len_keep = int(L (1 - ratio)) patches with the smallest
    noise are kept. -> (kept (N, len_keep, D), mask (N, L): 0 kept, 1 removed, ids_restore: unshuffles)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def mae_init(module):
    """models_mae.py initialize_weights / _init_weights: Linear weights (the attention's in-projection as timm's qkv
    Linear) xavier-uniform with zero biases, LayerNorms 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias) if m.bias is not None else None
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.xavier_uniform_(m.in_proj_weight)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAE(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.trunk, width = common.build_backbone(args.arch, args.image_size, vit=True)
        self.patch, self.mask_ratio, self.norm_pix_loss = common.VIT[args.arch][0], args.mask_ratio, args.norm_pix_loss
        side = args.image_size // self.patch
        # the encoder: fixed sin-cos position embedding (a frozen parameter, as official), the class token and
        # patch projection as initialize_weights (normal 0.02; xavier-uniform on the flattened conv weight)
        self.trunk.encoder.pos_embedding.data.copy_(sincos_position_embedding(width, side))
        self.trunk.encoder.pos_embedding.requires_grad = False
        # the light decoder: its own width, fixed embedding, blocks (timm's Block: common.Block), norm and pixel head
        self.decoder_embed = nn.Linear(width, args.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, args.decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_position_embedding(args.decoder_dim, side), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*(common.Block(args.decoder_heads, args.decoder_dim, 4 * args.decoder_dim, 0.0)
                                              for _ in range(args.decoder_depth)))
        self.decoder_norm = nn.LayerNorm(args.decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(args.decoder_dim, self.patch ** 2 * 3)
        mae_init(self)
        self.trunk.conv_proj.reset_parameters()  # timm's PatchEmbed conv: torch's bias init, then the weight's below
        nn.init.xavier_uniform_(self.trunk.conv_proj.weight.view(width, -1))
        nn.init.normal_(self.trunk.class_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, imgs, noise):
        """forward_encoder: embed the patches, add their positions, keep the unmasked ones, prepend the class token,
        run the trunk's blocks and final norm on the kept tokens only."""
        vit, pos = self.trunk, self.trunk.encoder.pos_embedding
        x = vit.conv_proj(imgs).flatten(2).transpose(1, 2) + pos[:, 1:]
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        x = torch.cat([(vit.class_token + pos[:, :1]).expand(len(x), -1, -1), x], 1)
        return vit.encoder.ln(vit.encoder.layers(x)), mask, ids_restore

    def decode(self, latent, ids_restore):
        """forward_decoder: a mask token for each removed patch, all tokens back in image order, positions, blocks,
        norm, then each patch's pixels; the class token's output dropped."""
        x = self.decoder_embed(latent)
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(len(x), ids_restore.shape[1] + 1 - x.shape[1], -1)], 1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]

    def forward(self, imgs, noise):
        latent, mask, ids_restore = self.encode(imgs, noise)
        pred = self.decode(latent, ids_restore)
        return mae_loss(patchify(imgs, self.patch), pred.float(), mask, self.norm_pix_loss), pred, mask


# ALGO LOGIC: loss (paper Sec. 3 and models_mae.py forward_loss): the mean squared error per patch, averaged over the
# removed patches only; with --norm-pix-loss the target is each patch normalised by its own mean and (unbiased) std
def mae_loss(target, pred, mask, norm_pix_loss=True):
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def save_grid(imgs, pred, mask, args, path):
    """PNG with three rows: originals, the encoder's input (removed patches grey), the reconstruction with the visible
    patches pasted back (pixels of a normalised patch de-normalised with the original patch's mean and std)."""
    p, target = common.VIT[args.arch][0], patchify(imgs.float(), common.VIT[args.arch][0])
    pred = pred.float()
    if args.norm_pix_loss:
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    removed = mask[..., None].bool()
    masked, filled = (unpatchify(torch.where(removed, fill, target), p) for fill in (torch.zeros_like(target), pred))
    mean, std = (torch.tensor(v, device=imgs.device)[:, None, None] for v in common.MEAN_STD[args.dataset])
    rows = (torch.cat([imgs.float(), masked, filled]) * std + mean).clamp(0, 1)  # back to [0, 1] pixels
    torchvision.utils.save_image(rows, path, nrow=len(imgs))


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    augmentation = mae_augmentation(args)
    pretrain_set, *probe_sets = common.build_datasets(args, augmentation)

    # ALGO LOGIC: model and optimizer
    model = MAE(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # timm 0.3.2's add_weight_decay: frozen parameters left out, 1-d ones and biases without decay (the class and
    # mask tokens are 3-d: decayed); AdamW with beta2 0.95
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if not (p.ndim == 1 or n.endswith(".bias"))]},
              {"params": [p for n, p in trained if p.ndim == 1 or n.endswith(".bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks share: the averaged gradients; nothing is gathered)
    ddp_model = model
    if common.world() > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    steps_per_epoch = len(sampler) // sampler.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256  # main_pretrain.py: blr * effective batch / 256
    patches, b = (args.image_size // common.VIT[args.arch][0]) ** 2, sampler.batch_size
    run.start(steps_per_epoch, start_epoch, start_step, peak_lr)

    # ALGO LOGIC: training loop (engine_pretrain.py train_one_epoch)
    for epoch in range(start_epoch, args.epochs):
        if run.done():  # also when resuming a run that already reached --max-steps
            break
        sampler.set_epoch(epoch)
        sampler.start_step = start_step if epoch == start_epoch else 0  # skip what a resumed run already did
        model.train()
        for step, (views, _, _) in enumerate(loader, start=sampler.start_step):
            k = run.global_step  # lr_sched.adjust_learning_rate at the fractional epoch: per step
            lr = common.cosine_lr(k, total_steps, warmup_steps, peak_lr, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            (x,) = augmentation.to_device(views, device)
            # the masking noise of the whole global batch from the step's generator, this rank's rows taken: the
            # same masks for any number of ranks (official: torch.rand per rank) and on --resume
            noise = torch.rand(args.batch_size, patches, generator=common.step_generator(args.seed, k, device),
                               device=device)[common.rank() * b:(common.rank() + 1) * b]
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # bf16 (official: fp16 with a GradScaler): a deviation
                loss, pred, mask = ddp_model(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda"
                                             else x, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = run.after_step(epoch, step, loss, lr)  # progress, checkpoints, monitor, divergence stop
            if common.rank() == 0 and (step + 1 == steps_per_epoch or done):  # at each epoch end, for the eye
                save_grid(x[:8], pred[:8].detach(), mask[:8], args, os.path.join(args.out, f"reconstruction_step{k + 1}.png"))
            if done:
                break

    # TRY NOT TO MODIFY: final evaluation (add --finetune-epochs: MAE's own evaluation) and consistency check across ranks
    return run.final_evaluation()


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
