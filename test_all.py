"""Smoke and correctness tests on CPU with tiny data: `pytest -q test_all.py`."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import common
import simclr

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "imagefolder", "--arch", "resnet-tiny", "--image-size", "32", "--workers", "0",
        "--print-freq", "1", "--probe-epochs", "2", "--knn-k", "5"]


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """A real ImageFolder: DATA/{train,val}/{class}/*.png, two classes of different colour and texture."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8)):
        for c, name in enumerate(("stripes", "blobs")):
            os.makedirs(root / split / name)
            for i in range(n):
                img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                if c == 0:
                    img[::4, :, 0] = 255
                else:
                    img[10:30, 10:30, 2] = 220
                torchvision.transforms.functional.to_pil_image(img).save(root / split / name / f"{i}.png")
    return str(root)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU + gloo, also on a GPU machine
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------
# The loss and the gather
# ---------------------------------------------------------------------------------------
def naive_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = {j: float(z[i] @ z[j]) / t for j in range(2 * n) if j != i}
        denominator = sum(np.exp(s) for s in sims.values())
        losses.append(-np.log(np.exp(sims[positive]) / denominator))
    return float(np.mean(losses))


def test_nt_xent_matches_naive_loop():
    torch.manual_seed(0)
    for t in (0.1, 0.5):
        z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
        assert simclr.nt_xent_loss(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5)


def _loss_and_grads(rank, world_size, init_file, out_file):
    """Loss and gradients of a small projector on this rank's half of a fixed global batch."""
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x1, x2 = torch.randn(8, 16), torch.randn(8, 16)
    n = 8 // world_size
    model = torch.nn.parallel.DistributedDataParallel(net) if world_size > 1 else net
    z = model(torch.cat([x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n]]))
    loss = simclr.nt_xent_loss(*z.chunk(2), temperature=0.2)
    loss.backward()
    result = {"loss": common.all_reduce_mean(loss.detach()).item(), "grads": [p.grad.clone() for p in net.parameters()]}
    if rank == 0:
        torch.save(result, out_file)
    if world_size > 1:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process(tmp_path):
    _loss_and_grads(0, 1, None, tmp_path / "single.pt")
    torch.multiprocessing.spawn(_loss_and_grads, args=(2, tmp_path / "init", tmp_path / "ddp.pt"), nprocs=2)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for g_ddp, g_single in zip(ddp["grads"], single["grads"]):
        torch.testing.assert_close(g_ddp, g_single, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Probing
# ---------------------------------------------------------------------------------------
def test_knn_matches_naive_vote_and_separates_clusters():
    g = torch.Generator().manual_seed(0)
    train_f, train_y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    test_f, test_y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    k, t = 7, 0.1
    correct = 0
    for f, y in zip(test_f, test_y):  # the vote written out plainly
        sims = F.cosine_similarity(train_f, f[None], dim=1)
        order = sims.argsort(descending=True)[:k]
        votes = [sum(float(torch.exp(sims[j] / t)) for j in order if train_y[j] == c) for c in range(3)]
        correct += int(np.argmax(votes) == int(y))
    assert common.knn_classify(train_f, train_y, test_f, test_y, k, t, chunk=6) == pytest.approx(100 * correct / 20)

    centres = torch.randn(4, 32, generator=g) * 5
    y = torch.arange(400) % 4
    f = centres[y] + torch.randn(400, 32, generator=g)
    assert common.knn_classify(f[:300], y[:300], f[300:], y[300:], k=20) == 100.0


def test_linear_probe_learns_separable_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 5, generator=g)
    f = torch.randn(1000, 32, generator=g) * 3 + 2
    y = (f @ w).argmax(1)  # linearly separable by construction
    top1, top5 = common.linear_probe(f[:800], y[:800], f[800:], y[800:], epochs=30)
    assert top1 > 90 and top5 == 100.0
    random_y = torch.randint(0, 5, (1000,), generator=g)
    top1, _ = common.linear_probe(f[:800], random_y[:800], f[800:], random_y[800:], epochs=30)
    assert top1 < 40  # chance is 20%


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------
def test_torchrun_two_ranks_stay_in_sync(tiny_imagefolder, tmp_path):
    out = str(tmp_path / "run")
    r = torchrun("simclr.py", *TINY, "--data", tiny_imagefolder, "--batch-size", "16", "--epochs", "2",
                 "--eval-every", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("loss") == 8  # 64 images / 16 = 4 steps an epoch, a line each, from rank 0 only
    metrics = read_metrics(out)
    train_lines = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, 9))
    assert all(m["img_per_s"] > 0 and m["lr"] >= 0 for m in train_lines)
    assert [m["epoch"] for m in metrics if "knn_top1" in m] == [1, 2]  # the monitor after epoch 1, then the end
    final = metrics[-1]
    assert final["rank_weight_max_diff"] == 0.0
    assert 0 <= final["knn_top1"] <= 100 and "linear_top1" in final
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)["epoch"] == 2


def test_resume_reaches_the_same_weights(tiny_imagefolder, tmp_path):
    args = TINY + ["--data", tiny_imagefolder, "--batch-size", "16", "--epochs", "2", "--probe-epochs", "0"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    simclr.main(args + ["--out", straight, "--workers", "2"])
    simclr.main(args + ["--out", stopped, "--max-steps", "4"])  # 4 steps per epoch: stops after epoch 1
    assert torch.load(os.path.join(stopped, "checkpoint.pth"), weights_only=False)["epoch"] == 1
    simclr.main(args + ["--out", stopped, "--resume", os.path.join(stopped, "checkpoint.pth")])
    a = torch.load(os.path.join(straight, "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(stopped, "checkpoint.pth"), weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    untrained = simclr.SimCLR("resnet-tiny", 32).state_dict()
    assert not torch.equal(a["model"]["encoder.conv1.weight"], untrained["encoder.conv1.weight"])

    # and from the middle of an epoch
    mid = str(tmp_path / "mid")
    simclr.main(args + ["--out", mid, "--max-steps", "6"])
    assert torch.load(os.path.join(mid, "checkpoint.pth"), weights_only=False)["step_in_epoch"] == 2
    simclr.main(args + ["--out", mid, "--resume", os.path.join(mid, "checkpoint.pth")])
    c = torch.load(os.path.join(mid, "checkpoint.pth"), weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], c["model"][key]), key


def test_backbone_loads_into_torchvision(tiny_imagefolder, tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--data", tiny_imagefolder, "--arch", "resnet18", "--image-size", "96", "--subset", "8",
                   "--batch-size", "4", "--probe-epochs", "0"]
    final = simclr.main(args + ["--epochs", "1", "--max-steps", "1", "--out", out])
    # evaluating the saved trunk again gives the run's own final kNN
    again = simclr.main(args + ["--eval-only", "--resume", os.path.join(out, "backbone.pth"), "--out", out])
    assert again["knn_top1"] == final["knn_top1"]
    state = torch.load(os.path.join(out, "backbone.pth"))
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    trained = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)["model"]
    assert torch.equal(net.layer4[1].conv2.weight, trained["encoder.layer4.1.conv2.weight"])
    # the torchvision model computes the trained trunk's features (BN statistics included)
    model = simclr.SimCLR("resnet18", 96)
    model.load_state_dict(trained)
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(net.eval()(x), model.encoder.eval()(x))


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def write_idx_gz(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_zalando_idx_files_from_data(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    for split in ("train", "test"):
        images_name, labels_name = common.FASHION_FILES[split]
        write_idx_gz(tmp_path / images_name, images)
        write_idx_gz(tmp_path / labels_name, labels)
    ds = common.fashion_mnist(str(tmp_path), "train")
    image, label = ds[5]
    assert len(ds) == 12 and label == labels[5] and image.mode == "RGB"
    assert np.array_equal(np.asarray(image)[:, :, 1], images[5])


def test_offline_download_says_what_to_place(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", type("CIFAR10", (torchvision.datasets.CIFAR10,),
                                                               {"__init__": offline}))
    expect_error(TINY + ["--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path)],
                 "could not download CIFAR10", "cifar-10-python.tar.gz", str(tmp_path))


# ---------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback from inside torch
# ---------------------------------------------------------------------------------------
def expect_error(argv, *words):
    with pytest.raises(SystemExit) as e:
        simclr.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    for w in words:
        assert w in message, message


def test_missing_data_folder(tmp_path):
    expect_error(TINY + ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)], "does not exist", "--data")
    expect_error(TINY + ["--data", str(tmp_path), "--out", str(tmp_path)], "train")


def test_truncated_checkpoint(tiny_imagefolder, tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--data", tiny_imagefolder, "--batch-size", "16", "--epochs", "1", "--max-steps", "1",
                   "--probe-epochs", "0", "--out", out]
    simclr.main(args)
    path = os.path.join(out, "checkpoint.pth")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    expect_error(args + ["--resume", path], "truncated or corrupt")
    simclr.main(args)  # a good checkpoint again, resumed with another architecture
    expect_error(args + ["--resume", path, "--arch", "resnet18"], "does not fit", "--arch")


def test_batch_not_divisible_by_world_size(tiny_imagefolder, tmp_path):
    r = torchrun("simclr.py", *TINY, "--data", tiny_imagefolder, "--batch-size", "15", "--out", str(tmp_path))
    assert r.returncode != 0
    assert "error: --batch-size 15 is not divisible by the world size 2" in r.stderr


# ---------------------------------------------------------------------------------------
# Real data: SimCLR must beat its own random init on Fashion-MNIST
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(common.DEBIAN_FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_simclr_beats_random_init_on_fashion_mnist(tmp_path):
    args = ["--dataset", "fashion-mnist", "--arch", "resnet-tiny", "--subset", "10000", "--batch-size", "256",
            "--workers", "2", "--probe-epochs", "0", "--print-freq", "20", "--seed", "0"]
    random_init = simclr.main(args + ["--eval-only", "--out", str(tmp_path / "random")])
    trained = simclr.main(args + ["--epochs", "5", "--lr", "2.0", "--temperature", "0.1", "--warmup-epochs", "0.5",
                                  "--color-jitter-strength", "0.5", "--out", str(tmp_path / "simclr")])
    print(f"kNN top-1: random init {random_init['knn_top1']:.2f}, SimCLR {trained['knn_top1']:.2f}")
    assert trained["knn_top1"] >= random_init["knn_top1"] + 5
    # and above what a random init reaches without zero-init residual BN (measured here: 66-68)
    assert trained["knn_top1"] >= 70
