"""Tests of opera.py: the loss terms, the momentum schedule, the two-process equivalence of the loss
and its gradient, the network's structure, and short runs of the script (demo path, torchrun, exact
resume, eval_linear.py on its backbone.pt, ViT, bad input)."""
import argparse
import copy
import json
import math
import os
import re
import signal
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock
from conftest import (REPO, assert_bf16_run_close_to_fp32, assert_same_state, read_log,
                      run_killed_after_first_checkpoint, run_script, run_signalled_mid_epoch)

import common
import eval_linear
import opera

TINY = ("--subset", 256, "--batch-size", 32, "--epochs", 2, "--eval-every", 0, "--workers", 0, "--mlp-dim", 512)


def model_args(arch, sup_weight=0.5):
    args = argparse.Namespace(arch=arch, dim=32, mlp_dim=64, temperature=None, sup_weight=sup_weight, lr=None,
                              wd=None, warmup_epochs=None, optimizer=None, crop_min=None, subset=None,
                              data="synthetic", crop_size=None, batch_size=256, ema=0.99)
    opera.resolve_recipe(args, native=32)
    return args


# ---------------------------------------------------------------------------------------------- loss terms
@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_contrastive_loss_equals_handwritten_infonce_with_2t_factor(temperature):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    total = 0.0
    for i in range(4):
        sims = [float(q[i] @ k[j]) / (q[i].norm().item() * k[j].norm().item()) / temperature for j in range(4)]
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims))  # -log softmax of the positive
    expected = 2 * temperature * total / 4
    assert opera.contrastive_loss(q, k, temperature).item() == pytest.approx(expected, rel=1e-5)
    # scaling the embeddings changes nothing: q and k are normalised
    assert opera.contrastive_loss(3 * q, 0.5 * k, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_unlabelled_samples_contribute_no_class_gradient():
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, -1, 3, -1, -1, 2])
    loss = opera.class_loss(logits, labels)
    loss.backward()
    assert loss.item() == pytest.approx(F.cross_entropy(logits[labels >= 0], labels[labels >= 0]).item(), rel=1e-6)
    assert logits.grad[labels < 0].abs().sum() == 0
    assert (logits.grad[labels >= 0].abs().sum(1) > 0).all()
    # a batch without any label: exactly 0 and no gradient (not NaN)
    logits.grad = None
    loss = opera.class_loss(logits, torch.full((6,), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_unlabelled_batch_trains_the_class_head_not_at_all_and_sup_weight_zero_is_mocov3():
    torch.manual_seed(0)
    model, _ = opera.build_model(model_args("resnet_tiny"), num_classes=4, small_images=True, img_size=16)
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = model(x1, x2, torch.full((8,), -1))
    assert out["loss_class"].item() == 0.0 and torch.equal(out["loss"], out["loss_self"])
    out["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.class_head.parameters())
    plain, _ = opera.build_model(model_args("resnet_tiny", sup_weight=0), num_classes=0, small_images=True,
                                 img_size=16)
    assert plain.class_head is None
    out = plain(x1, x2, torch.zeros(8, dtype=torch.long))
    assert torch.equal(out["loss"], out["loss_self"])


def _reference_step(model, x1, x2, labels, temperature, sup_weight, per_view=True):
    """One OPERA step written the way wangck20/OPERA (on MoCo v3's builder) computes it: each view goes
    through the online network and the momentum encoder in a call of its own."""
    def ctr(q, k):  # MoCo v3's contrastive_loss on one process
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return nn.CrossEntropyLoss()(q @ k.t() / temperature, torch.arange(len(q))) * 2 * temperature
    online = nn.Sequential(model.backbone, model.projector, model.predictor)
    momentum = nn.Sequential(model.momentum_backbone, model.momentum_projector)
    if per_view:
        q1, q2 = online(x1), online(x2)
        with torch.no_grad():
            k1, k2 = momentum(x1), momentum(x2)
        z1, z2 = model.class_head(q1), model.class_head(q2)
    else:  # both views in one call: batch-norm statistics over 2B mixed images
        q1, q2 = online(torch.cat([x1, x2])).chunk(2)
        with torch.no_grad():
            k1, k2 = momentum(torch.cat([x1, x2])).chunk(2)
        z1, z2 = model.class_head(torch.cat([q1, q2])).chunk(2)
    loss_self = 0.5 * (ctr(q1, k2) + ctr(q2, k1))
    return loss_self + sup_weight * (F.cross_entropy(z1, labels) + F.cross_entropy(z2, labels))


def _gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_training_step_equals_the_reference_computation_per_view():
    torch.manual_seed(0)
    model, _ = opera.build_model(model_args("resnet_tiny"), num_classes=4, small_images=True, img_size=16)
    args = model_args("resnet_tiny")
    x1, x2, labels = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    ours, reference, mixed = model, copy.deepcopy(model), copy.deepcopy(model)
    loss = ours(x1, x2, labels)["loss"]
    loss.backward()
    expected = _reference_step(reference, x1, x2, labels, args.temperature, 0.5)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    got, want = _gradients(ours), _gradients(reference)
    assert got.keys() == want.keys() and len(got) > 20
    for name in want:
        assert (got[name] - want[name]).norm() <= 1e-5 * want[name].norm() + 1e-12, name
    # the test can fail: one call on both views gives another loss and another backbone gradient
    _reference_step(mixed, x1, x2, labels, args.temperature, 0.5, per_view=False).backward()
    g_mixed, g_ref = _gradients(mixed)["backbone.conv1.weight"], want["backbone.conv1.weight"]
    assert (g_mixed - g_ref).norm() > 0.05 * g_ref.norm()


def test_momentum_schedule_rises_from_0_99_to_1():
    m = common.cosine_schedule(0.99, 1.0, epochs=3, iters_per_epoch=10, endpoint=False)  # opera's main() call
    t = np.arange(30)
    assert len(m) == 30 and m[0] == pytest.approx(0.99, abs=1e-12)
    assert np.allclose(m, 1 - 0.5 * (1 + np.cos(np.pi * t / 30)) * (1 - 0.99))  # m(t) of the spec
    assert (np.diff(m) > 0).all() and 1 - m[-1] < 1e-4  # m(T_total) = 1; the last step is 1 - 3e-5


# ---------------------------------------------------------------------------------------------- two processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embed(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _losses(out, keys, labels, dim, temperature):
    q, z = out[:, :dim], out[:, dim:]
    return {"ctr": opera.contrastive_loss(q, keys, temperature), "cls": opera.class_loss(z, labels)}


def _two_process_worker(rank, port, data, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, keys, labels, weight, dim, temperature = data
    mine = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    model = nn.parallel.DistributedDataParallel(_embed(weight))
    result = {}
    for term in ("ctr", "cls"):  # one DDP forward / backward per loss term
        out = model(x[mine])
        out.retain_grad()
        loss = _losses(out, keys[mine], labels[mine], dim, temperature)[term]
        loss.backward()
        result[term] = (loss.detach(), out.grad / dist.get_world_size(), model.module.weight.grad.clone())
        model.module.weight.grad = None
    torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    common.destroy_process_group()


def test_two_processes_equal_one_process_with_the_concatenated_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    dim, classes, temperature = 5, 3, 0.2
    x, keys = torch.randn(8, 6, generator=gen), torch.randn(8, dim, generator=gen)
    labels = torch.tensor([0, 2, -1, 1, -1, -1, 2, -1])  # 3 labelled on process 0, 1 on process 1
    weight = torch.randn(dim + classes, 6, generator=gen)
    mp.spawn(_two_process_worker, args=(_free_port(), (x, keys, labels, weight, dim, temperature), str(tmp_path)),
             nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    layer = _embed(weight)
    for term in ("ctr", "cls"):
        out = layer(x)
        out.retain_grad()
        loss = _losses(out, keys, labels, dim, temperature)[term]
        loss.backward()
        per_process = [r[term] for r in results]
        # the loss averaged over the processes, the embeddings' gradient and DDP's averaged weight gradient
        assert torch.allclose(torch.stack([p[0] for p in per_process]).mean(), loss, atol=1e-6), term
        assert torch.allclose(torch.cat([p[1] for p in per_process]), out.grad, atol=1e-6), term
        for p in per_process:
            assert torch.allclose(p[2], layer.weight.grad, atol=1e-6), term
        assert out.grad.abs().sum() > 0
        layer.weight.grad = None


# ---------------------------------------------------------------------------------------------- structure, data
@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18", "vit_small"])
def test_network_structure(arch):
    vit = arch == "vit_small"
    model, feat_dim = opera.build_model(model_args(arch), num_classes=7, small_images=True, img_size=32)
    for mlp in (model.projector, model.predictor, model.class_head):
        assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    assert sum(isinstance(m, nn.Linear) for m in model.projector) == (3 if vit else 2)
    assert isinstance(model.predictor[-1], nn.BatchNorm1d if vit else nn.Linear)
    assert model.class_head[0].in_features == 32 and model.class_head[-1].out_features == 7
    assert not any(p.requires_grad for p in model.momentum_backbone.parameters())
    assert not any(p.requires_grad for p in model.momentum_projector.parameters())
    assert_same_state(model.momentum_backbone.state_dict(), model.backbone.state_dict())
    if vit:
        assert not any(p.requires_grad for p in model.backbone.conv_proj.parameters())
    else:  # zero-init residual branches for the paper's ResNets, not for the demo network
        blocks = [m for m in model.backbone.modules() if isinstance(m, BasicBlock)]
        assert blocks and all(b.bn2.weight.any() == (arch == "resnet_tiny") for b in blocks)


def test_labeled_fraction_is_a_seeded_function_of_the_image_index():
    indices = np.arange(100, 300)
    keep = set(opera.labeled_indices(indices, 0.25, seed=3).tolist())
    assert len(keep) == 50 and keep <= set(indices.tolist())
    assert keep == set(opera.labeled_indices(indices[::-1].copy(), 0.25, seed=3).tolist())  # order is irrelevant
    assert keep != set(opera.labeled_indices(indices, 0.25, seed=4).tolist())
    data = opera.PartiallyLabeled(common.Synthetic("train", size=300), sorted(keep))
    labels = [data[i][1] for i in range(300)]
    assert [i for i, y in enumerate(labels) if y >= 0] == sorted(keep)
    assert all(y == i % 10 for i, y in enumerate(labels) if y >= 0)


def test_views_are_byols_asymmetric_pair_and_small_images_are_not_blurred():
    aug = opera.TwoViewAugmentation(224, 0.2)
    assert [(c.blur_p, c.solarize_p) for c in (aug.colour1, aug.colour2)] == [(1.0, 0.0), (0.1, 0.2)]
    assert aug.colour1.sigma == (0.1, 2.0)
    small = opera.TwoViewAugmentation(32, 0.2, small=True)  # 64 px or less: no blur (a no-op at 32/224 sigma)
    assert [(c.blur_p, c.solarize_p) for c in (small.colour1, small.colour2)] == [(0.0, 0.0), (0.0, 0.2)]
    crop = small.geometric.transforms[0]
    assert tuple(crop.size) == (32, 32) and crop.scale == (0.2, 1.0)


# ---------------------------------------------------------------------------------------------- runs of the script
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The no-argument demo, shortened: one epoch on 256 images (kNN before and after, class head top-1)."""
    out = tmp_path_factory.mktemp("opera") / "demo"
    result = run_script("opera.py", "--epochs", 1, "--subset", 256, "--out", out)
    return out, result


def test_demo_path_runs_and_logs(demo_run):
    out, result = demo_run
    log = read_log(out)
    assert "args" in log[0] and log[0]["args"]["arch"] == "resnet_tiny" and log[0]["args"]["optimizer"] == "lars"
    assert log[1]["epoch"] == 0 and 0 <= log[1]["knn_top1"] <= 100
    last = log[-1]
    for key in ("loss", "loss_self", "loss_class", "lr", "ema", "images_per_s", "peak_mem_mb", "head_top1",
                "knn_top1", "knn_top5"):
        assert key in last and math.isfinite(last[key]), key
    assert last["loss"] == pytest.approx(last["loss_self"] + 0.5 * last["loss_class"], rel=1e-4)
    assert re.search(r"kNN top-1: [\d.]+% after training vs [\d.]+% at random init", result.stdout)
    assert result.stdout.count("recipe: lr 0.6 (2.4 x 64/256") == 1  # the demo's recipe, printed once
    assert log[0]["recipe"]["optimizer"] == "LARS (eta 0.001)"
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["backbone"]["method"] == "opera"


def test_eval_linear_reads_backbone_pt(demo_run):
    out, _ = demo_run
    if not (REPO / "eval_linear.py").exists():
        pytest.skip("eval_linear.py is not in the repository yet")
    run_script("eval_linear.py", "--ckpt", out / "backbone.pt", "--data", "synthetic", "--subset", 500)
    with open(out / "eval_synthetic.json") as f:
        result = json.load(f)
    assert 0 <= result["knn"]["top1"] <= 100 and 0 <= result["linear"]["top1"] <= 100


def test_torchrun_two_processes_with_partial_labels(tmp_path):
    out = tmp_path / "ddp"
    run_script("opera.py", *TINY, "--eval-every", 2, "--labeled-fraction", 0.5, "--out", out, nproc=2)
    log = read_log(out)
    assert [line["epoch"] for line in log[1:]] == [0, 1, 2]
    assert all(math.isfinite(line["loss"]) and line["loss_class"] > 0 for line in log[2:])
    assert "knn_top1" in log[-1] and "head_top1" in log[-1]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 * (256 // 32) and len(ckpt["rng"]) == 2


def test_exact_resume_after_a_crash(tmp_path):
    run_script("opera.py", *TINY, "--out", tmp_path / "straight")
    first = run_killed_after_first_checkpoint("opera.py", *TINY, out=tmp_path / "crashed")
    assert first["epoch"] == 1
    run_script("opera.py", *TINY, "--out", tmp_path / "crashed")
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=True)
            for name in ("straight", "crashed"))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    # the momentum encoder moved, but less than the online network
    assert not torch.equal(a["model"]["momentum_projector.0.weight"], a["model"]["projector.0.weight"])
    # checkpoint.pt holds each tensor once: its backbone record has no weights of its own (they are the
    # "backbone." entries of "model"), and eval_linear reads them back exactly as backbone.pt holds them
    assert "state_dict" not in b["backbone"] and b["backbone"]["state_dict_prefix"] == "backbone."
    saved = torch.load(tmp_path / "crashed" / "backbone.pt", map_location="cpu", weights_only=True)
    from_checkpoint = eval_linear.load_backbone(str(tmp_path / "crashed" / "checkpoint.pt"))
    assert_same_state(from_checkpoint["state_dict"], saved["state_dict"])
    assert {k: v for k, v in from_checkpoint.items() if k != "state_dict"} == {
        k: v for k, v in saved.items() if k != "state_dict"}
    # resuming with other options is refused in one sentence
    result = run_script("opera.py", *TINY, "--sup-weight", 0, "--out", tmp_path / "crashed", check=False)
    assert result.returncode == 2 and "--sup-weight" in result.stderr and "Traceback" not in result.stderr


LONG_EPOCH = ("--subset", 384, "--batch-size", 16, "--epochs", 2, "--eval-every", 0, "--workers", 0, "--mlp-dim", 64)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run that the stopped and resumed ones must equal."""
    out = tmp_path_factory.mktemp("opera") / "straight"
    run_script("opera.py", *LONG_EPOCH, "--out", out)
    return out


def test_sigterm_mid_epoch_saves_and_the_resumed_run_is_bit_equal(tmp_path, straight_run):
    code, stderr = run_signalled_mid_epoch("opera.py", *LONG_EPOCH, out=tmp_path / "stopped")
    assert code == common.EXIT_STOPPED and "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and 3 <= saved["step"] < 24  # inside the first epoch of 24 steps
    assert len(read_log(tmp_path / "stopped")) == 1  # the header: no epoch has ended
    run_script("opera.py", *LONG_EPOCH, "--out", tmp_path / "stopped")
    a, b = (torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            for out in (straight_run, tmp_path / "stopped"))
    assert a["step"] == b["step"] == 48
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    log_a, log_b = read_log(straight_run), read_log(tmp_path / "stopped")
    assert [r["epoch"] for r in log_b[1:]] == [1, 2]  # one line per epoch
    for key in ("loss", "loss_self", "loss_class"):  # the stopped epoch's mean covers all its steps
        assert [r[key] for r in log_a[1:]] == pytest.approx([r[key] for r in log_b[1:]], rel=1e-6)


def test_sigusr1_to_one_rank_of_two_stops_both_at_one_step_and_resumes_bit_equal(tmp_path):
    ddp_args = (*LONG_EPOCH, "--log-every", 2)
    run_script("opera.py", *ddp_args, "--out", tmp_path / "straight", nproc=2)
    code, stderr = run_signalled_mid_epoch("opera.py", *ddp_args, out=tmp_path / "stopped", nproc=2, rank=1,
                                           sig=signal.SIGUSR1, after_steps=2)
    assert code != 0 and "stopped by a signal to another process after step" in stderr
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and 2 <= saved["step"] < 24 and saved["step"] % 2 == 0 and len(saved["rng"]) == 2
    run_script("opera.py", *ddp_args, "--out", tmp_path / "stopped", nproc=2)
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=True)
            for name in ("straight", "stopped"))
    assert a["step"] == b["step"] == 48
    assert_same_state(a["model"], b["model"])


def test_save_every_writes_checkpoints_inside_an_epoch_and_resume_from_one_is_exact(tmp_path, straight_run):
    run_killed_after_first_checkpoint("opera.py", *LONG_EPOCH, "--save-every", 1e-9, out=tmp_path / "timed")
    first = torch.load(tmp_path / "timed" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 0 and 1 <= first["step"] < 24  # written after a step of the first epoch
    run_script("opera.py", *LONG_EPOCH, "--out", tmp_path / "timed")
    a, b = (torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            for out in (straight_run, tmp_path / "timed"))
    assert_same_state(a["model"], b["model"])


def test_a_single_class_folder_is_refused_unless_sup_weight_is_zero(tmp_path):
    folder = tmp_path / "one" / "train" / "only"
    folder.mkdir(parents=True)
    for i in range(8):
        common.Synthetic("val", size=8)[i][0].save(folder / f"{i}.png")
    result = run_script("opera.py", "--data", tmp_path / "one", "--out", tmp_path / "out", check=False)
    assert result.returncode == 2 and "labels for 1 class(es)" in result.stderr and "--sup-weight 0" in result.stderr
    assert not (tmp_path / "out").exists()


def test_vit_small_runs_a_few_steps_with_a_frozen_patch_embedding(tmp_path):
    out = tmp_path / "vit"
    run_script("opera.py", "--arch", "vit_small", "--subset", 16, "--batch-size", 8, "--epochs", 1, "--eval-every", 0,
               "--workers", 0, "--mlp-dim", 256, "--warmup-epochs", 0, "--lr", 0.01, "--out", out)
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = ckpt["model"]
    assert ckpt["step"] == 2 and ckpt["args"]["optimizer"] == "adamw" and ckpt["args"]["temperature"] == 0.2
    # the online weights moved away from the momentum encoder's, except the frozen patch embedding
    assert not torch.equal(model["backbone.encoder.ln.weight"], model["momentum_backbone.encoder.ln.weight"])
    assert torch.equal(model["backbone.conv_proj.weight"], model["momentum_backbone.conv_proj.weight"])
    assert ckpt["backbone"]["arch"] == "vit_small" and ckpt["backbone"]["img_size"] == 32


def test_crop_size_comes_from_the_dataset_as_a_whole_and_the_flag_overrides_it(tmp_path):
    from PIL import Image
    root = tmp_path / "photos"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):  # the first training image is 240 x 180, the others 300 x 400
                size = (240, 180) if (split, c, i) == ("train", "a", 0) else (300, 400)
                Image.new("RGB", size, (60 * i, 100, 200 if c == "a" else 20)).save(root / split / c / f"{i}.jpg")
    tiny = ("--batch-size", 4, "--epochs", 1, "--eval-every", 0, "--workers", 0, "--mlp-dim", 32, "--dim", 16)
    result = run_script("opera.py", "--data", root, *tiny, "--out", tmp_path / "big")
    assert "crop sizes: crop 224 px (images of about 300 px" in result.stdout
    assert read_log(tmp_path / "big")[0]["args"]["crop_size"] == 224
    ckpt = torch.load(tmp_path / "big" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["backbone"]["img_size"] == 224 and not ckpt["backbone"]["small_images"]
    result = run_script("opera.py", "--data", root, *tiny, "--crop-size", 64, "--out", tmp_path / "flag")
    assert "crop 64 px" in result.stdout and read_log(tmp_path / "flag")[0]["args"]["crop_size"] == 64
    result = run_script("opera.py", *tiny, "--subset", 8, "--out", tmp_path / "small")  # 32 px synthetic images
    assert "crop 32 px (images of about 32 px, 64 px or less" in result.stdout


@pytest.mark.parametrize("flags, word", [(("--labeled-fraction", 1.5), "--labeled-fraction"),
                                         (("--sup-weight", -1), "--sup-weight")])
def test_bad_flag_exits_with_one_sentence_and_no_output(tmp_path, flags, word):
    out = tmp_path / "bad"
    result = run_script("opera.py", *flags, "--out", out, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0]
    assert not out.exists()


def test_unlabelled_folder_needs_sup_weight_zero(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        common.Synthetic("val", size=2)[i][0].save(folder / f"{i}.png")
    result = run_script("opera.py", "--data", folder, "--out", tmp_path / "out", check=False)
    assert result.returncode == 2 and "--sup-weight 0" in result.stderr and not (tmp_path / "out").exists()


def test_bf16_run_is_close_to_fp32(tmp_path, straight_run):
    assert_bf16_run_close_to_fp32("opera.py", *LONG_EPOCH, out=tmp_path / "bf16", fp32_out=straight_run)


def test_compiled_run_computes_what_the_eager_run_does(tmp_path, straight_run):
    """--compile (TorchInductor on the CPU here; the same path that runs on GPUs) trains to the same loss."""
    if why := common.compile_unsupported():
        pytest.skip(f"torch.compile cannot run here: {why}")
    run_script("opera.py", *LONG_EPOCH, "--compile", "--out", tmp_path / "compiled", timeout=600)
    compiled, eager = read_log(tmp_path / "compiled"), read_log(straight_run)
    assert compiled[0]["args"]["compile"] is True
    assert abs(compiled[-1]["loss"] - eager[-1]["loss"]) < 0.02 * abs(eager[-1]["loss"])
