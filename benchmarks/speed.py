"""Training-step speed of every sslref method against the limit of its backbone, in one process.

    python benchmarks/speed.py                                              # CPU: resnet-tiny at 32 px
    python benchmarks/speed.py --arch resnet50 --image-size 224 --batch-size 64   # CUDA: bf16, channels_last

For each method it reports, in images per second:
- step: the method's own training loop (its file's main(), unchanged) fed one augmented batch that is already on
  the device, every step: forward, loss, backward, optimiser, queue / bank updates, all of it;
- trunk: the bare trunk's forward + backward on exactly the tensors the method pushes through it, recorded by a
  hook during one real step (2 views for SimCLR, a forward + backward and a no-grad forward for MoCo, 4B rotations,
  9B tiles, 49B patches, ...), without the method's heads, losses or optimiser;
- ratio: step / trunk (1.0 = nothing beyond the backbone);
- data: a data worker's stage alone on one CPU thread, on in-memory images (the colour ops of SimCLR, MoCo and
  InstDisc run on the device, inside the step); benchmarks/pipeline.py measures JPEGs at 224 px.

With --peers (pip install lightly), BYOL, SimSiam, Barlow Twins, VICReg, SwAV, DINO, MAE and MoCo v3 are also timed as
lightly builds them: its heads, loss and momentum update (its examples' training step), on a trunk of the same kind,
the same batch (every crop) and the same device colour stage, with the file's optimizer; "vs lightly" is the file's
step img/s over lightly's. The trunk is a ResNet (--arch), also for DINO; MAE and MoCo v3 run on a ViT (--vit-arch):
MAE against lightly's MaskedVisionTransformerTorchvision and MAEDecoder (its torchvision example), MoCo v3 against its
MoCoProjectionHead in v3's configuration (lightly has no MoCo v3 loss: its NTXentLoss at T 0.2, SimCLR's loss, stands
in). A ViT's trunk column is the whole ViT on the images (MAE's encoder sees a quarter of the patches).
"""
import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torchvision
from torch.utils.data import default_collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

METHODS = ["simclr", "moco", "instdisc", "cpc", "rotation", "jigsaw", "context_encoder", "denoising_autoencoder",
           "relative_position", "colorization", "byol", "simsiam", "barlow_twins", "vicreg", "swav", "dino", "mae", "mocov3"]
PEERS = ["byol", "simsiam", "barlow_twins", "vicreg", "swav", "dino", "mae", "mocov3"]  # timed against lightly's with --peers
ON_VIT = ("mae", "mocov3")  # timed on --vit-arch
METHOD_FLAGS = {"instdisc": ["--nce-k", "4096"], "moco": ["--mlp", "--aug-plus"]}  # MoCo v2; lemniscate's K


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--arch", default="resnet-tiny")
    p.add_argument("--vit-arch", default="vit-tiny", help="the trunk of MAE and MoCo v3")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cudnn autotuning, compile)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--data-images", type=int, default=64, help="images through the augmentation pipeline")
    p.add_argument("--compile", action="store_true", help="pass --compile to the methods (the trunk is compiled too)")
    p.add_argument("--peers", action="store_true", help="also time lightly's BYOL and SimSiam (pip install lightly)")
    return p.parse_args(argv)


class SyntheticImages(torch.utils.data.Dataset):
    """Random RGB images a little larger than the crop (as ImageNet's are), decoded already, labels 0..9."""

    def __init__(self, n, side):
        self.n, self.side, self.labels = n, side, [i % 10 for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (self.side, self.side, 3), generator=g, dtype=torch.uint8)
        return torchvision.transforms.functional.to_pil_image(pixels.numpy()), self.labels[i]


class FixedBatch:
    """Stands in for the training loader and its sampler: the same batch, already on the device, every step."""

    def __init__(self, batch, steps, batch_size):
        self.batch, self.steps, self.batch_size, self.start_step = batch, steps, batch_size, 0

    def __iter__(self):
        return iter([self.batch] * self.steps)

    def __len__(self):  # as the sampler: images per epoch
        return self.steps * self.batch_size

    def set_epoch(self, epoch):
        pass


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return type(batch)(to_device(b, device) for b in batch)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, args, device):
    """img/s of step() over --steps calls, after --warmup untimed ones, the device waited for at both ends."""
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.batch_size * args.steps / (time.perf_counter() - start)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def measure_method(name, args, device, method_flags=None):
    """-> (step img/s, recorded trunk calls, trunk copies, pretraining dataset) from the method's own main()."""
    module = __import__(name)
    state = {"calls": [], "trunks": {}, "marks": [], "dataset": None}
    side = max(args.image_size + 4, round(args.image_size * 1.15))
    total = args.warmup + args.steps

    def build_datasets(margs, train_transform):
        probe = common.Transformed(SyntheticImages(16, side), common.eval_transform(margs.dataset, margs.image_size))
        state["dataset"] = common.Transformed(SyntheticImages(max(4096, args.batch_size), side), train_transform,
                                              margs.seed)
        return state["dataset"], probe, probe

    def train_loader(dataset, margs):
        batch = to_device(default_collate([dataset[(i, 0)] for i in range(margs.batch_size)]), device)
        state["batch"] = batch
        fixed = FixedBatch(batch, total, margs.batch_size)
        return fixed, fixed

    run_init, after_step = common.Run.__init__, common.Run.after_step

    def init(run, margs, *rest, **objects):
        run_init(run, margs, *rest, **objects)
        for trunk in (m for m in objects["model"].modules() if isinstance(m, (torchvision.models.ResNet, common.ViT))):
            state["trunks"][id(trunk)] = copy.deepcopy(trunk)
            # on conv1 (a ViT's patch projection), whose input is the trunk's: the context encoder runs the trunk's
            # layers up to its feature map, MAE the ViT's blocks on the kept patches
            first = trunk.conv_proj if isinstance(trunk, common.ViT) else trunk.conv1
            first.register_forward_hook(lambda m, inputs, out, key=id(trunk): state["calls"].append(
                (tuple(inputs[0].shape), torch.is_grad_enabled(), m.training, key)) if not state["marks"] else None)

    def timed_after_step(run, epoch, step, loss, lr):
        if run.global_step + 1 in (1, args.warmup, total):  # after the first step (the hooks' record) and the window
            sync(device)
            state["marks"].append(time.perf_counter())
        return after_step(run, epoch, step, loss, lr)

    flags = ["--dataset", "imagefolder", "--arch", args.vit_arch if name in ON_VIT else args.arch, "--image-size", str(args.image_size),
             "--batch-size", str(args.batch_size), "--workers", "0", "--epochs", "1", "--max-steps", str(total),
             "--print-freq", str(10 ** 9), "--probe-epochs", "0", "--seed", "0"]
    flags += METHOD_FLAGS.get(name, []) if method_flags is None else method_flags
    flags += ["--compile"] if args.compile else []
    if name == "moco":
        flags += ["--moco-k", str(args.batch_size * (65536 // args.batch_size))]
    with tempfile.TemporaryDirectory() as out, \
            patched(common, "build_datasets", build_datasets), patched(common, "train_loader", train_loader), \
            patched(common.Run, "__init__", init), patched(common.Run, "after_step", timed_after_step), \
            patched(common.Run, "final_evaluation", lambda run, extra=None: {}):
        module.main(flags + ["--out", out])
    step_img_s = args.batch_size * args.steps / (state["marks"][-1] - state["marks"][-2])
    return step_img_s, state


def measure_trunk(state, args, device, amp):
    """Forward + backward of copies of the method's trunks on random tensors of the recorded shapes."""
    calls = state["calls"]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    inputs = [torch.randn(shape, device=device).contiguous(memory_format=fmt) for shape, *_ in calls]
    trunks = {key: t.to(device) for key, t in state["trunks"].items()}
    if args.compile:
        trunks = {key: torch.compile(t) for key, t in trunks.items()}

    def step():
        outputs = []
        for x, (_, grad, training, key) in zip(inputs, calls):
            trunks[key].train(training)
            with torch.set_grad_enabled(grad), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                out = trunks[key](x)
            if grad:
                outputs.append(out.float().mean())
        torch.stack(outputs).sum().backward()

    return timed(step, args, device)


def measure_lightly(name, args, device, amp, state):
    """lightly's step of the method (its examples: heads and loss; for BYOL update_momentum before the forward) on the
    batch the file's own step used, through the file's device colour stage, with the file's optimizer (LARS; SGD for
    SimSiam) -> img/s."""
    from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, VICRegLoss
    from lightly.models.modules import heads
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    torch.manual_seed(0)
    if name in ON_VIT:
        return measure_lightly_vit(name, args, device, amp, state)
    trunk, width = common.build_backbone(args.arch, args.image_size, zero_init_residual=name not in ("swav", "dino"))
    if name in ("swav", "dino"):
        return measure_lightly_multi_crop(name, trunk, width, args, device, amp, state)
    if name == "byol":  # the widths of the official code, which byol.py uses
        online = nn.Sequential(trunk, heads.BYOLProjectionHead(width, 4096, 256))
        predictor = heads.BYOLPredictionHead(256, 4096, 256)
        target = copy.deepcopy(online)
        deactivate_requires_grad(target)
        trained = nn.ModuleList([online, predictor])
        optimizer = common.LARS(common.lars_groups(trained), lr=0.1, weight_decay=1e-6)
    elif name == "simsiam":  # hidden width = the trunk's, as the official builder and simsiam.py (lightly's: 2048)
        online = nn.Sequential(trunk, heads.SimSiamProjectionHead(width, width, 2048))
        predictor, target = heads.SimSiamPredictionHead(2048, 512, 2048), None
        trained = nn.ModuleList([online, predictor])
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:  # Barlow Twins, VICReg: one network, 8192 wide as the files' default, no predictor
        head = heads.BarlowTwinsProjectionHead if name == "barlow_twins" else heads.VICRegProjectionHead
        online, predictor, target = nn.Sequential(trunk, head(width, 8192, 8192)), None, None
        optimizer = common.LARS(common.lars_groups(online), lr=0.1, weight_decay=1e-6)
        pair_loss = BarlowTwinsLoss(lambda_param=0.0051) if name == "barlow_twins" else VICRegLoss()
    models = [m for m in (online, predictor, target) if m is not None]
    for m in models:
        m.to(device).train()
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
    criterion, (views, _, _), augmentation = NegativeCosineSimilarity(), state["batch"], state["dataset"].transform

    def step():
        x = augmentation.to_device(views, device)
        x0, x1 = x if len(x) == 2 else x[0].chunk(2)
        if target is not None:
            update_momentum(online, target, m=0.99)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            z0, z1 = online(x0), online(x1)
        if predictor is None:
            loss = pair_loss(z0.float(), z1.float())
        else:
            loss = predicted(z0, z1, x0, x1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def predicted(z0, z1, x0, x1):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            p0, p1 = predictor(z0), predictor(z1)
            if target is not None:
                with torch.no_grad():
                    z0, z1 = target(x0), target(x1)
            return 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))

    return timed(step, args, device)


def measure_lightly_multi_crop(name, trunk, width, args, device, amp, state):
    """lightly's SwAV (SwaVProjectionHead, SwaVPrototypes, SwaVLoss) or DINO (DINOProjectionHead, DINOLoss, the teacher
    by update_momentum) step as its examples write it: the trunk once per crop, the widths of the files' defaults."""
    from lightly.loss import DINOLoss, SwaVLoss
    from lightly.models.modules import heads
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    if name == "swav":
        student = nn.Sequential(trunk, heads.SwaVProjectionHead(width, 2048, 128))
        prototypes, teacher = heads.SwaVPrototypes(128, 3000), None
        criterion, trained = SwaVLoss(), nn.ModuleList([student, prototypes])
        optimizer = common.LARS(trained.parameters(), lr=0.1, weight_decay=1e-6, larc=True)
    else:
        student, prototypes = nn.Sequential(trunk, heads.DINOProjectionHead(width, 2048, 256, 65536)), None
        teacher = nn.Sequential(copy.deepcopy(trunk), heads.DINOProjectionHead(width, 2048, 256, 65536))  # as its example
        deactivate_requires_grad(teacher)
        criterion, trained = DINOLoss(65536, warmup_teacher_temp_epochs=0), student
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    for m in (m for m in (trained, teacher, criterion) if m is not None):
        m.to(device).train()
        if device.type == "cuda":
            m.to(memory_format=torch.channels_last)
    (views, _, _), augmentation = state["batch"], state["dataset"].transform

    def step():
        crops = [c for group in augmentation.to_device(views, device) for c in group.chunk(len(group) // args.batch_size)]
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            if name == "swav":
                prototypes.normalize()
                scores = [prototypes(nn.functional.normalize(student(c), dim=1)) for c in crops]
                loss = criterion(scores[:2], scores[2:])
            else:
                update_momentum(student, teacher, m=0.996)
                with torch.no_grad():
                    t = [teacher(c) for c in crops[:2]]
                loss = criterion(t, [student(c) for c in crops], epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, args, device)


def measure_lightly_vit(name, args, device, amp, state):
    """lightly's MAE (MaskedVisionTransformerTorchvision, MAEDecoder of the file's default width and depth, its
    random_token_mask, patchify and MSE: its torchvision example) or MoCo v3 (MoCoProjectionHead: a 3-layer projector
    and 2-layer predictor with BN, 4096 wide, 256 out; update_momentum before the keys; NTXentLoss at T 0.2 both ways),
    the patch projection frozen as mocov3.py's, AdamW as the files'."""
    from lightly.loss import NTXentLoss
    from lightly.models import utils
    from lightly.models.modules import heads
    from lightly.models.modules.masked_autoencoder import MAEDecoder
    from lightly.models.modules.masked_vision_transformer_torchvision import MaskedVisionTransformerTorchvision
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    vit, width = common.build_backbone(args.vit_arch, args.image_size, vit=True)
    patch = common.VIT[args.vit_arch][0]
    if name == "mae":
        backbone = MaskedVisionTransformerTorchvision(vit=vit)
        decoder = MAEDecoder(seq_length=vit.seq_length, num_layers=8, num_heads=16, embed_input_dim=width,
                             hidden_dim=512, mlp_dim=2048, out_dim=patch ** 2 * 3)
        mask_token = nn.Parameter(torch.zeros(1, 1, 512))
        trained, momentum = nn.ModuleList([backbone, decoder]), None
        params = [*trained.parameters(), mask_token]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    else:
        vit.conv_proj.requires_grad_(False)
        student = nn.Sequential(vit, heads.MoCoProjectionHead(width, 4096, 256, num_layers=3, batch_norm=True))
        predictor = heads.MoCoProjectionHead(256, 4096, 256, num_layers=2, batch_norm=True)
        momentum = copy.deepcopy(student)
        deactivate_requires_grad(momentum)
        trained, criterion = nn.ModuleList([student, predictor]), NTXentLoss(temperature=0.2, gather_distributed=True)
        optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    for m in (m for m in (trained, momentum) if m is not None):
        m.to(device).train()
    if name == "mae":
        mask_token.data = mask_token.data.to(device)
    (views, _, _), augmentation = state["batch"], state["dataset"].transform

    def step():
        x = augmentation.to_device(views, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            if name == "mae":
                images = x[0].contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x[0]
                idx_keep, idx_mask = utils.random_token_mask((len(images), vit.seq_length), 0.75, device=device)
                encoded = backbone.encode(images, idx_keep=idx_keep)
                tokens = utils.set_at_index(utils.repeat_token(mask_token, (len(images), vit.seq_length)), idx_keep,
                                            decoder.embed(encoded).type_as(mask_token))
                pred = decoder.predict(utils.get_at_index(decoder.decode(tokens), idx_mask))
                target = utils.get_at_index(utils.patchify(images, patch), idx_mask - 1)
                loss = nn.functional.mse_loss(pred.float(), target.float())
            else:
                update_momentum(student, momentum, m=0.99)
                x0, x1 = x
                p0, p1 = trained[1](student(x0)), trained[1](student(x1))
                with torch.no_grad():
                    k0, k1 = momentum(x0), momentum(x1)
                loss = criterion(p0.float(), k1.float()) + criterion(p1.float(), k0.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, args, device)


def measure_data(dataset, n):
    """The augmentation pipeline on one thread, as one data worker runs it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for i in range(n):
            dataset[(i, 0)]
        return n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def describe(calls):
    """'2 x (32, 3, 32, 32)' style summary of the trunk calls of one step; 'no grad' for forward-only ones."""
    seen = {}
    for shape, grad, _, _ in calls:
        key = f"{tuple(shape)}{'' if grad else ' no grad'}"
        seen[key] = seen.get(key, 0) + 1
    return ", ".join(f"{n} x {key}" if n > 1 else key for key, n in seen.items())


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    where = torch.cuda.get_device_name() if amp else f"{os.cpu_count()} CPU cores"
    print(f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {where}" +
          (", bf16 autocast, channels_last" if amp else "") + (", torch.compile" if args.compile else ""))
    print("| method | step img/s | trunk img/s | ratio | data img/s per worker | trunk inputs per step |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.methods:
        torch.manual_seed(0)
        step_img_s, state = measure_method(name, args, device)
        trunk_img_s = measure_trunk(state, args, device, amp)
        data_img_s = measure_data(state["dataset"], args.data_images)
        rows.append({"method": name, "step_img_s": step_img_s, "trunk_img_s": trunk_img_s,
                     "ratio": step_img_s / trunk_img_s, "data_img_s": data_img_s, "trunk_inputs": describe(state["calls"])})
        print(f"| {name} | {step_img_s:.0f} | {trunk_img_s:.0f} | {step_img_s / trunk_img_s:.2f} | {data_img_s:.0f} | "
              f"{rows[-1]['trunk_inputs']} |", flush=True)
        if args.peers and name in PEERS:
            rows[-1]["lightly_img_s"] = measure_lightly(name, args, device, amp, state)
    peers = [r for r in rows if "lightly_img_s" in r]
    if peers:
        print("\n| method | step img/s | lightly's step img/s | vs lightly |\n|---|---|---|---|")
        for r in peers:
            print(f"| {r['method']} | {r['step_img_s']:.0f} | {r['lightly_img_s']:.0f} | "
                  f"{r['step_img_s'] / r['lightly_img_s']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
