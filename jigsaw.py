# Jigsaw puzzles: Noroozi and Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
# Puzzles", ECCV 2016 (arXiv:1603.09246). Optimiser as the official Caffe solver (MehdiNoroozi/JigsawPuzzleSolver,
# solver_cfn_jps.prototxt) and the common PyTorch port (bbrattoli/JigsawPuzzlePytorch).
#
#   python jigsaw.py --data /imagenet                                   # one GPU (or CPU)
#   torchrun --nproc_per_node=8 jigsaw.py --data /imagenet              # 8 GPUs
#
# Geometry: the paper's Fig. 3 (a random 225 crop of the image resized to 256, 3x3 cells of 75, a random 64
# tile in each), not the port's 255 / 85 / 64; other --image-size values scale it (puzzle_geometry).
# The trunk learns on 64 px tiles; the probe, as for every method, reads it on the whole image.
# Short runs (benchmarks/run.py): --batch-size 128 --lr 0.05 (5x the solver's 0.01 per 256, chosen for a few
#   epochs on Fashion-MNIST) with no drops (--schedule).
import argparse
import itertools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Jigsaw puzzle pretraining + kNN / linear evaluation")
    # ALGO LOGIC: the flags every method file shares (common.add_common_args), with this file's recipe as defaults;
    # official solver: 350K iterations at batch 256, about 70 ImageNet epochs (as the port's 70); lr 0.01, wd 5e-4
    common.add_common_args(p, "jigsaw", arch="resnet50", epochs=70, batch_size=256, lr=0.01, wd=5e-4)
    # ALGO LOGIC: jigsaw hyper-parameters
    p.add_argument("--momentum", type=common.unit_float, default=0.9, help="SGD momentum (official solver 0.9)")
    # official solver: x0.1 every 100K of 350K steps = every 20 epochs, as the port's 20 of 70
    p.add_argument("--schedule", type=common.nonneg_int, nargs="*", default=[20, 40, 60], help="epochs where lr drops x0.1")
    p.add_argument("--num-permutations", type=common.positive_int, default=1000, help="puzzle classes (paper: 1000)")
    p.add_argument("--grayscale", type=common.unit_float, default=0.3, help="fraction of images made grey (paper/port: 0.3)")
    args = common.parse(p, argv)
    return args


# ALGO LOGIC: the permutation set (Sec. 3.2, Algorithm 1)
def maximal_hamming_permutations(num, seed):
    """num orders of the 9 tiles, chosen greedily: start from a random one (from seed), then repeatedly add the
    candidate whose summed Hamming distance to those already chosen is largest (first on ties). Row r: the
    tile shown at each position of puzzle class r. Vectorised over all 9! = 362,880 candidates (~5 s for 1000)."""
    candidates = torch.tensor(list(itertools.permutations(range(9))), dtype=torch.uint8)  # (9!, 9)
    j = int(torch.randint(len(candidates), (), generator=torch.Generator().manual_seed(seed)))
    distance_sum = torch.zeros(len(candidates), dtype=torch.int32)  # D-bar of Algorithm 1
    chosen = torch.zeros(len(candidates), dtype=torch.bool)
    order = []
    for _ in range(num):
        order.append(j)
        chosen[j] = True
        distance_sum += (candidates != candidates[j]).sum(1, dtype=torch.int32)
        j = int(distance_sum.masked_fill(chosen, -1).argmax())
    return candidates[order].long()


# ALGO LOGIC: the puzzle, cut in the data workers (seeded per sample by common.Transformed)
def puzzle_geometry(image_size):
    """(crop, cell, tile, channel jitter) in px. The paper's 225 / 75 / 64 / 2 at --image-size 224 (Fig. 3; jitter
    of the colour channels by 0 to +-2 px against chromatic aberration, Sec. 3.3), scaled by image_size / 224 and
    rounded: 28 px (Fashion-MNIST) gives 27 / 9 / 8 / 0, 32 px 33 / 11 / 9 / 0, 96 px 96 / 32 / 27 / 1."""
    def geometry(size):
        cell = round(size * 75 / 224)
        tile = round(cell * 64 / 75)
        return 3 * cell, cell, tile, round(tile * 2 / 64)
    crop, cell, tile, jitter = geometry(image_size)
    if tile >= cell:  # no gap between tiles: edges would match across cells, the shortcut the gap removes
        smallest = next(s for s in range(1, 1000) if geometry(s)[2] < geometry(s)[1])
        common.fail(f"--image-size {image_size} gives {cell} px cells with no room for a gap around the {tile} px "
                    f"tiles; jigsaw needs --image-size >= {smallest}")
    return crop, cell, tile, jitter


def cut_tiles(image, cell, tile, jitter):
    """image (C, 3*cell, 3*cell) -> tiles (9, C, tile, tile) in row-major cell order, and their top-left corners
    (9, C, 2). Each tile lies at a random place inside its cell (the random gap, Sec. 3.3); each colour channel
    may move by up to +-jitter px, staying inside the cell. Advanced indexing, no loop over tiles."""
    C = image.shape[0]
    cells = torch.tensor([(r, c) for r in range(3) for c in range(3)]) * cell  # (9, 2) cell corners
    margin = jitter if cell - tile >= 2 * jitter else 0  # room for the channel shifts, so they rarely clamp
    place = torch.randint(margin, cell - tile - margin + 1, (9, 1, 2))
    shift = torch.randint(-jitter, jitter + 1, (9, C, 2))
    corners = cells[:, None] + (place + shift).clamp(0, cell - tile)  # (9, C, 2)
    offsets = torch.arange(tile)
    rows, cols = corners[..., 0, None] + offsets, corners[..., 1, None] + offsets  # (9, C, tile) each
    channel = torch.arange(C)[None, :, None, None]
    return image[channel, rows[..., :, None], cols[..., None, :]], corners


def normalize_tiles(tiles):
    """Each tile's channels to zero mean and unit std on their own (Sec. 3.3: no low-level statistics shortcut)."""
    mean, std = tiles.mean((2, 3), keepdim=True), tiles.std((2, 3), keepdim=True)
    return (tiles - mean) / torch.where(std > 0, std, 1.0)


class JigsawPuzzle:
    """image -> (tiles (9, C, t, t) shown in the order of a random permutation, that permutation's index)."""

    def __init__(self, args, permutations):
        self.crop, self.cell, self.tile, self.jitter = puzzle_geometry(args.image_size)
        self.permutations, self.grayscale = permutations, args.grayscale
        self.square = T.Compose([T.Resize(round(self.crop * 256 / 225)), T.RandomCrop(self.crop), T.ToTensor()])

    def __call__(self, image):
        x = self.square(image)  # (3, crop, crop) in [0, 1]
        gray = bool(torch.rand(()) < self.grayscale)  # against chromatic aberration (port: 30% of images)
        if gray:
            x = T.functional.rgb_to_grayscale(x, num_output_channels=3)
        tiles, _ = cut_tiles(x, self.cell, self.tile, 0 if gray else self.jitter)  # jitter: colour images only
        return shuffle_tiles(normalize_tiles(tiles), self.permutations)


def shuffle_tiles(tiles, permutations):
    """A random class r of the set; position p shows tile permutations[r, p] -> (shuffled tiles, r)."""
    r = int(torch.randint(len(permutations), ()))
    return tiles[permutations[r]], r


# ALGO LOGIC: the context-free network (Sec. 3.1): one shared trunk per tile, fc6 per tile, concat, fc7, fc8
class JigsawNet(nn.Module):
    def __init__(self, arch, image_size, permutations, fc6_dim=1024, fc7_dim=4096):
        super().__init__()
        self.trunk, width = common.build_backbone(arch, image_size)  # stem chosen for the probe's image size
        self.fc6 = nn.Linear(width, fc6_dim)  # shared by the 9 columns (official prototxt / port: 1024)
        self.fc7 = nn.Linear(9 * fc6_dim, fc7_dim)  # on the 9 concatenated fc6 outputs (4096)
        self.fc8 = nn.Linear(fc7_dim, len(permutations))
        self.register_buffer("permutations", permutations)  # the class set travels with the checkpoint

    def forward(self, tiles, keep6=None, keep7=None):
        """tiles (b, 9, C, t, t) -> logits over the permutations. keep6 (b, 9*fc6_dim) and keep7 (b, fc7_dim)
        are dropout masks (0 or 1/(1-p)), drawn by the caller from the step generator; None: no dropout."""
        b = tiles.shape[0]
        f = self.trunk(tiles.flatten(0, 1))  # (b, 9, C, t, t) -> (9b, C, t, t): one batch through the trunk
        h = F.relu(self.fc6(f)).reshape(b, -1)  # (9b, fc6) -> (b, 9*fc6), concatenated in position order
        h = h if keep6 is None else h * keep6.to(h.dtype)  # 0 and 2 are exact in bf16
        h = F.relu(self.fc7(h))
        h = h if keep7 is None else h * keep7.to(h.dtype)
        return self.fc8(h)


def dropout_masks(b, widths, generator, p=0.5):
    """Dropout (p 0.5 after fc6 and fc7, as AlexNet / the port) from the step's own generator, drawn for the global
    batch and this rank's rows kept, so --resume repeats them exactly."""
    rank, world_size = common.rank(), common.world()
    return [(torch.rand(world_size * b, w, generator=generator, device=generator.device)[rank * b:(rank + 1) * b]
             >= p) / (1 - p) for w in widths]


def learning_rate(epoch, args):
    """Per epoch, x0.1 at each --schedule milestone (official solver: step policy, gamma 0.1)."""
    return args.lr * args.batch_size / 256 * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def main(argv=None):
    # TRY NOT TO MODIFY: distributed start-up, seeds, --out, data
    args = parse_args(argv)
    device = common.setup(args)
    if args.num_permutations > 362880:
        common.fail(f"--num-permutations {args.num_permutations} is more than the 9! = 362880 orders of 9 tiles; "
                    "use at most 362880 (the paper: 1000)")
    permutations = maximal_hamming_permutations(args.num_permutations, args.seed)
    puzzle = JigsawPuzzle(args, permutations)  # checks the geometry before any data is read
    pretrain_set, *probe_sets = common.build_datasets(args, puzzle)

    # ALGO LOGIC: model and optimizer
    model = JigsawNet(args.arch, args.image_size, permutations).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=args.momentum, weight_decay=args.wd)

    # TRY NOT TO MODIFY: checkpoints, resume, evaluation-only
    run = common.Run(args, device, probe_sets, model.trunk, model=model, optimizer=optimizer)
    start_epoch, start_step = run.resume()
    puzzle.permutations = model.permutations.cpu()  # a resumed run keeps the set its checkpoint was trained on
    if args.eval_only:
        return run.final_evaluation()
    loader, sampler = common.train_loader(pretrain_set, args)
    # ALGO LOGIC: the DDP wrapper (what the ranks average and share)
    ddp_model = model
    if common.world() > 1:  # per-GPU BN over that GPU's 9b tiles
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
        for step, ((tiles, order), _, _) in enumerate(loader, start=sampler.start_step):
            tiles, order = tiles.to(device, non_blocking=True), order.to(device, non_blocking=True)
            if device.type == "cuda":  # channels_last per tile: the trunk's (9b, C, t, t) view keeps it
                tiles = tiles.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (len(tiles), 9))
            keep6, keep7 = dropout_masks(len(tiles), (model.fc7.in_features, model.fc7.out_features),
                                         common.step_generator(args.seed, run.global_step, device))
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                logits = ddp_model(tiles, keep6, keep7)
            loss = F.cross_entropy(logits.float(), order)  # which of the permutations was applied
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
