"""eval_linear.py: kNN + linear probes, the random baseline, real ImageFolder data, bad input."""
import argparse
import json
import os

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.transforms import v2

import common
import eval_linear
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
    if case == "checkpoint that fits nothing":  # MoCo v2's layout (encoder_q.), not among the known prefixes
        torch.save(_layout("moco v2", torchvision.models.resnet18().state_dict()), tmp_path / "v2.pth")
        return ["--ckpt", tmp_path / "v2.pth", "--arch", "resnet18", *data], \
            "does not fill a resnet18: at best 0 of its 120 tensors"
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


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "arch mismatch",
                                  "checkpoint that fits nothing", "missing data folder", "empty data folder",
                                  "unreadable image"])
def test_bad_input_exits_with_one_sentence_and_writes_nothing(case, tmp_path):
    args, expected = _bad_input(tmp_path, case)
    out = tmp_path / "out"
    result = run_script("eval_linear.py", *args, "--out", out, check=False, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert len(lines[0]) <= 400, lines[0]  # a few example keys, never the whole list
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


# ----------------------------------------------------------------------------------------------
# The papers' own checkpoints: each reference's layout, built around a state dict `sd` (the backbone to find) with
# decoys beside it (momentum encoder, student, EMA model: other values) that must not be taken
# ----------------------------------------------------------------------------------------------
def _layout(name, sd, arch="resnet18"):
    decoy = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    head = {"0.weight": torch.randn(8, 4), "0.bias": torch.zeros(8)}
    under = lambda prefix, d: {f"{prefix}{k}": v for k, v in d.items()}  # noqa: E731
    if name == "moco v3":  # main_moco.py: DDP(MoCo_ResNet) with base_encoder (fc: the projector), momentum_encoder
        return {"epoch": 100, "arch": arch, "optimizer": {"state": {}, "param_groups": []},
                "state_dict": {**under("module.base_encoder.", sd), **under("module.base_encoder.fc.", head),
                               **under("module.momentum_encoder.", decoy), **under("module.predictor.", head)}}
    if name == "moco v2":  # main_moco.py of MoCo v1/v2: encoder_q / encoder_k, not among PREFIXES
        return {"epoch": 200, "state_dict": {**under("module.encoder_q.", sd), **under("module.encoder_k.", decoy)}}
    if name == "swav zoo":  # swav_800ep_pretrain.pth.tar: the bare DDP state dict with its heads
        return {**under("module.", sd), **under("module.projection_head.", head),
                "module.prototypes.weight": head["0.weight"]}
    if name == "swav checkpoint":  # main_swav.py's checkpoint.pth.tar
        return {"epoch": 3, "state_dict": under("module.", sd), "optimizer": {"state": {}, "param_groups": []}}
    if name == "dino":  # main_dino.py: teacher (DDP with batch norms) and student, MultiCropWrapper's backbone / head
        return {"epoch": 5, "teacher": {**under("module.backbone.", sd), **under("module.head.", head)},
                "student": {**under("module.backbone.", decoy), **under("module.head.", head)}}
    if name == "byol solo-learn":  # a Lightning checkpoint: backbone (online) and momentum_backbone
        return {"epoch": 9, "state_dict": {**under("backbone.", sd), **under("momentum_backbone.", decoy),
                                           **under("projector.", head)}}
    if name == "byol-pytorch":  # BYOL(net): online_encoder.net, target_encoder.net
        return {**under("online_encoder.net.", sd), **under("target_encoder.net.", decoy),
                **under("online_encoder.projector.net.", head)}
    if name == "t-rex zoo":  # trex.pth: a torchvision resnet50 state dict without fc
        return dict(sd)
    if name == "t-rex full":  # trex_2_checkpoint_full.pth (its pickled args aside): DDP(tReX) with model, model_ema
        return {"epoch": 100, "model": {**under("module.model.encoder.", sd), **under("module.model.head.", head),
                                        **under("module.model_ema.encoder.", decoy)}}
    raise ValueError(name)


LAYOUTS = ["moco v3", "swav zoo", "swav checkpoint", "dino", "byol solo-learn", "byol-pytorch", "t-rex zoo",
           "t-rex full"]
EXPECTED_PREFIX = {"moco v3": "state_dict.base_encoder.", "swav zoo": "", "swav checkpoint": "state_dict.",
                   "dino": "teacher.backbone.", "byol solo-learn": "state_dict.backbone.",
                   "byol-pytorch": "online_encoder.net.", "t-rex zoo": "", "t-rex full": "model.model.encoder."}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_reference_layout_loads_the_right_encoder(layout, tmp_path):
    model, _ = common.build_backbone("resnet_tiny", True)  # 3x3 stem: read off conv1
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(_layout(layout, sd, "resnet_tiny"), tmp_path / "ckpt.pth")
    record = eval_linear.load_backbone(tmp_path / "ckpt.pth", arch="resnet_tiny")
    assert record["prefix"] == EXPECTED_PREFIX[layout] and record["loaded"] == len(sd) == 72
    assert record["small_images"] and record["method"] == "foreign"
    rebuilt, _ = eval_linear.backbone_from_record(record)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in sd.items())  # the base / online / teacher's


def test_prefix_flag_picks_another_encoder_and_a_wrong_one_is_refused(tmp_path):
    model, _ = common.build_backbone("resnet_tiny", False)
    sd = model.state_dict()
    torch.save(_layout("dino", sd), tmp_path / "dino.pth")
    student = eval_linear.load_backbone(tmp_path / "dino.pth", "resnet_tiny", prefix="student.backbone.")
    assert torch.equal(student["state_dict"]["conv1.weight"], sd["conv1.weight"] + 1) and not student["small_images"]
    with pytest.raises(common.UserError, match=r"at best 0 of its 72 tensors \(under 'student\.'.*keys look like "
                                               r"teacher\.backbone\.conv1\.weight, student\.backbone\.conv1\.weight"):
        eval_linear.load_backbone(tmp_path / "dino.pth", "resnet_tiny", prefix="student.")


def test_pickled_arguments_need_unsafe_load_and_name_the_arch(tmp_path):
    """DINO's and t-ReX's full checkpoints pickle their argparse arguments: a weights-only load refuses them."""
    model, _ = common.build_backbone("resnet_tiny", True)
    ckpt = dict(_layout("dino", model.state_dict()), args=argparse.Namespace(arch="resnet_tiny", lr=0.1))
    torch.save(ckpt, tmp_path / "full.pth")
    with pytest.raises(common.UserError, match="pickled Python objects.*pass --unsafe-load$"):
        eval_linear.load_backbone(tmp_path / "full.pth")
    record = eval_linear.load_backbone(tmp_path / "full.pth", unsafe=True)  # the arch from args.arch
    assert record["arch"] == "resnet_tiny" and record["prefix"] == "teacher.backbone." and record["epoch"] == 5


def test_missing_num_batches_tracked_is_tolerated_and_counted(tmp_path):
    model, _ = common.build_backbone("resnet_tiny", True)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    record = eval_linear.load_backbone(tmp_path / "old.pth", "resnet_tiny")
    assert record["loaded"] == len(sd) == 72 - 12 and len(record["state_dict"]) == 72


def test_moco_v3_checkpoint_of_torchvision_resnet18_is_read_counted_and_evaluated(tmp_path):
    """The acceptance case: MoCo v3's layout around a torchvision resnet18 (with its `arch` and `epoch`, no record of
    the images: ImageNet stem and statistics by default), evaluated on a tiny ImageFolder."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.fc = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 8))  # MoCo v3 puts its projector in fc
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save(_layout("moco v3", sd) | {"state_dict": {**_layout("moco v3", sd)["state_dict"],
                                                        **{f"module.base_encoder.{k}": v for k, v in
                                                           net.state_dict().items() if k.startswith("fc.")}}},
               tmp_path / "checkpoint_0099.pth.tar")
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "data" / split / str(c)).mkdir(parents=True)
            for i in range(8):
                common.Synthetic(split)[c * 50 + i][0].save(tmp_path / "data" / split / str(c) / f"{i}.png")
    result = run_script("eval_linear.py", "--ckpt", tmp_path / "checkpoint_0099.pth.tar", "--data", tmp_path / "data",
                        "--img-size", "32", "--epochs", "2", "--workers", "0", "--out", tmp_path / "out")
    assert "loaded 120 of the 120 tensors of its resnet18 under 'state_dict.base_encoder.'" in result.stdout
    assert "the ImageNet stem (read off conv1), 32 px, mean [0.485, 0.456, 0.406]" in result.stdout
    report = json.loads((tmp_path / "out" / "eval_data.json").read_text())
    assert report["method"] == "foreign" and report["trained_epochs"] == 100 and report["arch"] == "resnet18"
    assert report["linear"]["backbone_unchanged"] and not report["small_images"] and report["test_images"] == 16
    assert 0 <= report["knn"]["top1"] <= 100 and 0 <= report["linear"]["top1"] <= 100


def test_a_backbone_changed_during_the_evaluation_fails_loudly():
    backbone, _ = common.build_backbone("resnet_tiny", True)
    loaded = {k: v.clone() for k, v in backbone.state_dict().items()}
    eval_linear.check_unchanged(backbone, loaded)  # untouched: passes
    with torch.no_grad():
        backbone.bn1.running_mean[0] += 1e-7  # one number, one ulp-scale step: bit for bit, not approximately
    with pytest.raises(RuntimeError, match=r"the backbone changed during the evaluation \(1 tensors, e.g. bn1"):
        eval_linear.check_unchanged(backbone, loaded)
