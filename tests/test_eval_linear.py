"""eval_linear.py: kNN + linear probes, the random baseline, real ImageFolder data, bad input."""
import argparse
import json
import os

import pytest
import torch
import torch.nn as nn
from torchvision.transforms import v2

import common
from conftest import run_script, save_backbone


def _eval(ckpt, out, *extra, nproc=1, name="synthetic"):
    """Run eval_linear.py and return its eval_<name>.json."""
    run_script("eval_linear.py", "--ckpt", ckpt, "--out", out, *extra, nproc=nproc)
    with open(os.path.join(out, f"eval_{name}.json")) as f:
        return json.load(f)


def test_random_baseline_default_command_prints_and_writes_json(tmp_path):
    """The acceptance command: `python eval_linear.py --ckpt random --arch resnet_tiny --data synthetic`."""
    out = tmp_path / "random"
    result = run_script("eval_linear.py", "--ckpt", "random", "--arch", "resnet_tiny", "--data", "synthetic",
                        "--out", out)
    report = json.loads((out / "eval_synthetic.json").read_text())
    assert "kNN (k=20, T=0.07)" in result.stdout and "linear (fast)" in result.stdout
    assert report["train_images"] == 10_000 and report["test_images"] == 2_000 and report["num_classes"] == 10
    for protocol in ("knn", "linear"):
        assert 0 <= report[protocol]["top1"] <= report[protocol]["top5"] <= 100
    assert len(report["linear"]["sweep_heldout_top1"]) == 9 and report["method"] == "random"
    assert report["knn"]["top1"] < 30  # random features know little about shape


class _Augment:
    def __init__(self):
        self.tf = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1)), v2.RandomHorizontalFlip(),
                              *common.to_normalized_tensor()])

    def __call__(self, image, label):
        return self.tf(image), label


def test_supervised_training_beats_random_init_by_20_points(tmp_path):
    """The synthetic data is learnable and the evaluation measures it: plain cross-entropy training
    of resnet_tiny for ~30 s lifts the kNN top-1 at least 20 points above the random-init backbone."""
    torch.manual_seed(0)
    ddp = common.init_distributed()
    loader = common.train_loader(common.Synthetic("train"), _Augment(), 64, ddp, workers=2, seed=0, subset=6000)
    backbone, dim = common.build_backbone("resnet_tiny", True, 32)
    model = nn.Sequential(backbone, nn.Linear(dim, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    epochs = 3
    schedule = common.cosine_schedule(3e-3, 0.0, epochs, len(loader))
    step = 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            opt.param_groups[0]["lr"] = schedule[step]
            loss = nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    save_backbone(tmp_path / "backbone.pt", backbone, method="supervised", arch="resnet_tiny",
                  small_images=True, img_size=32, feat_dim=dim, args=argparse.Namespace(), epoch=epochs)
    trained = _eval(tmp_path / "backbone.pt", tmp_path / "trained", "--subset", "3000", "--epochs", "30")
    random = _eval("random", tmp_path / "random", "--arch", "resnet_tiny", "--subset", "3000", "--epochs", "30")
    assert trained["method"] == "supervised" and trained["trained_epochs"] == epochs
    assert trained["knn"]["top1"] >= random["knn"]["top1"] + 20, (trained["knn"], random["knn"])
    assert trained["linear"]["top1"] >= random["linear"]["top1"] + 20, (trained["linear"], random["linear"])


def test_full_protocol_trains_a_linear_layer_on_a_frozen_backbone(tmp_path):
    report = _eval("random", tmp_path, "--arch", "resnet_tiny", "--mode", "full", "--epochs", "2",
                   "--subset", "1000", "--batch-size", "128", "--lr", "1.0")
    linear = report["linear"]
    assert linear["mode"] == "full" and linear["backbone_unchanged"] and linear["epochs"] == 2
    assert linear["lr"] == pytest.approx(1.0 * 128 / 256) and linear["weight_decay"] == 0
    assert 0 <= linear["top1"] <= linear["top5"] <= 100


def test_frozen_probe_keeps_batch_norm_statistics():
    backbone, dim = common.build_backbone("resnet_tiny", True, 32)
    from eval_linear import FrozenProbe
    probe = FrozenProbe(backbone, dim, 10).train()
    before = backbone.bn1.running_mean.clone()
    probe(torch.randn(8, 3, 32, 32)).sum().backward()
    assert not backbone.training and torch.equal(before, backbone.bn1.running_mean)
    assert all(p.grad is None for p in backbone.parameters()) and probe.linear.weight.grad is not None


def test_two_processes_give_the_same_knn_as_one(tmp_path):
    args = ("--arch", "resnet_tiny", "--subset", "600", "--epochs", "5", "--lr", "0.1", "--wd", "0")
    one = _eval("random", tmp_path / "one", *args)
    two = _eval("random", tmp_path / "two", *args, nproc=2)
    assert one["knn"] == two["knn"] and two["processes"] == 2
    assert one["linear"]["top1"] == pytest.approx(two["linear"]["top1"], abs=0.5)


def test_cifar10_image_folder(cifar10_root, tmp_path):
    report = _eval("random", tmp_path, "--arch", "resnet_tiny", "--data", str(cifar10_root), "--subset", "5000",
                   "--epochs", "20", name="cifar10")
    assert report["num_classes"] == 10 and report["test_images"] == 10_000 and report["small_images"]
    assert 10 < report["knn"]["top1"] < 60 and 10 < report["linear"]["top1"] < 70


def _bad_input(tmp_path, case):
    """Build the bad input of one case; returns the eval_linear arguments."""
    data = ["--data", "synthetic"]
    if case == "missing checkpoint":
        return ["--ckpt", tmp_path / "nope.pt", *data], "does not exist"
    if case == "not a checkpoint":
        (tmp_path / "notes.pt").write_text("hello")
        return ["--ckpt", tmp_path / "notes.pt", *data], "not a readable PyTorch checkpoint"
    if case == "arch mismatch":
        model, dim = common.build_backbone("resnet_tiny", True)
        save_backbone(tmp_path / "b.pt", model, method="m", arch="resnet_tiny", small_images=True,
                      img_size=32, feat_dim=dim, args=argparse.Namespace(), epoch=0)
        return ["--ckpt", tmp_path / "b.pt", "--arch", "resnet18", *data], "holds a resnet_tiny backbone"
    if case == "missing data folder":
        return ["--ckpt", "random", "--arch", "resnet_tiny", "--data", tmp_path / "nodata"], "no such dataset or folder"
    if case == "empty data folder":
        (tmp_path / "empty" / "train").mkdir(parents=True)
        (tmp_path / "empty" / "val").mkdir()
        return ["--ckpt", "random", "--arch", "resnet_tiny", "--data", tmp_path / "empty"], "no images found"
    if case == "unreadable image":
        for split in ("train", "val"):
            for c in ("a", "b"):
                folder = tmp_path / "imgs" / split / c
                folder.mkdir(parents=True)
                for i in range(3):
                    common.Synthetic(split)[i][0].save(folder / f"{i}.png")
        (tmp_path / "imgs" / "train" / "b" / "9.png").write_bytes(b"\x89PNG broken")
        return ["--ckpt", "random", "--arch", "resnet_tiny", "--data", tmp_path / "imgs", "--workers", "1"], \
            "cannot read image"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "arch mismatch", "missing data folder",
                                  "empty data folder", "unreadable image"])
def test_bad_input_exits_with_one_sentence_and_writes_nothing(case, tmp_path):
    args, expected = _bad_input(tmp_path, case)
    out = tmp_path / "out"
    result = run_script("eval_linear.py", *args, "--out", out, check=False, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_check_data_decodes_every_image_and_names_the_broken_ones(tmp_path):
    from PIL import Image
    folder = tmp_path / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(folder / f"{i}.jpg")
    (folder / "notes.txt").write_text("not an image: ignored, as training ignores it")
    result = run_script("eval_linear.py", "--check-data", tmp_path / "data", "--workers", 1)
    assert "6 images under" in result.stdout and "0 unreadable" in result.stdout
    whole = (folder / "0.jpg").read_bytes()
    (folder / "5.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: its header still reads
    (folder / "4.jpg").write_bytes(b"garbage")
    result = run_script("eval_linear.py", "--check-data", tmp_path / "data", "--workers", 0, check=False)
    assert result.returncode == 1 and "2 unreadable" in result.stdout
    assert {line.split()[1] for line in result.stdout.splitlines() if line.startswith("unreadable:")} == {
        str(folder / "4.jpg"), str(folder / "5.jpg")}
