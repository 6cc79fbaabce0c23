"""Tests of rotssl.py: the rotation task, Sinkhorn, the SwAV and BYOL losses, and the script end to end."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import default_collate

import common
import rotssl
from conftest import assert_same_state, read_log, run_killed_after_first_checkpoint, run_script

# a tiny run: 256 images, batch 32, 16 px global / 8 px local crops, no kNN monitor
TINY = ["--subset", "256", "--batch-size", "32", "--epochs", "2", "--eval-every", "0", "--workers", "0",
        "--global-size", "16", "--local-size", "8", "--n-local", "2"]


# ---------------------------------------------------------------------------- the rotation task
def test_rotation_labels_match_the_rotation_applied():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    rotated, k = rotssl.rotate_views(x)
    assert k.shape == (64,) and set(k.tolist()) == {0, 1, 2, 3}  # every class drawn, k = 0 included
    for image, back, r in zip(x, rotated, k.tolist()):
        assert torch.equal(torch.rot90(back, -r, dims=(1, 2)), image)  # rotating back by -k is exact
        assert torch.equal(back, image) == (r == 0)  # and only k = 0 leaves the image as it was


def test_augmentation_draws_rotations_per_view_and_only_when_asked():
    image = common.Synthetic("train", size=4)[0][0]
    for base, n_local in (("swav", 3), ("byol", 0)):
        torch.manual_seed(0)
        samples = [rotssl.Augmentation(base, 16, 8, 3, rotate=True)(image) for _ in range(20)]
        batch = default_collate(samples)
        assert len(batch["global"]) == 2 and len(batch["local"]) == n_local
        assert batch["rotation"].shape == (20, 2)
        assert (batch["rotation"][:, 0] != batch["rotation"][:, 1]).any()  # independent per view
        for view, rotated, k in zip(batch["global"], batch["rotated"], batch["rotation"].t()):
            for i in range(20):
                assert torch.equal(torch.rot90(rotated[i], -int(k[i]), dims=(1, 2)), view[i])
        assert "rotated" not in rotssl.Augmentation(base, 16, 8, 3, rotate=False)(image)


def count_backbone_calls(model):
    """Record the input of every call of the online and (BYOL) target backbones."""
    calls = {"online": [], "target": []}
    for name, key in (("backbone", "online"), ("target_backbone", "target")):
        net = getattr(model, name, None)
        if net is not None:
            forward = net.forward
            net.forward = lambda x, forward=forward, key=key: (calls[key].append(x), forward(x))[1]
    return calls


@pytest.mark.parametrize("base", ["swav", "byol"])
def test_rot_weight_zero_runs_no_rotated_forward(base):
    image = common.Synthetic("train", size=4)[0][0]
    for rot_weight in (0.0, 0.1):
        torch.manual_seed(0)
        aug = rotssl.Augmentation(base, 16, 8, 2, rotate=rot_weight > 0)
        batch = default_collate([aug(image) for _ in range(8)])
        backbone, feat_dim = common.build_backbone("resnet_tiny", True, 16)
        model = rotssl.RotSSL(backbone, feat_dim, base, rot_weight, n_prototypes=10)
        calls = count_backbone_calls(model)
        losses = model(batch)
        base_calls = 2 if base == "swav" else 1  # one call per crop resolution
        globals_ = torch.cat(batch["global"])
        assert torch.equal(calls["online"][0], globals_)
        if rot_weight == 0:
            assert len(calls["online"]) == base_calls and model.rotation_head is None
            assert set(losses) == {"loss", "loss_base"} and torch.equal(losses["loss"], losses["loss_base"])
        else:  # two more calls, one per rotated view, each with exactly the rotated batch
            assert len(calls["online"]) == base_calls + 2
            for seen, rotated in zip(calls["online"][base_calls:], batch["rotated"]):
                assert torch.equal(seen, rotated)
            expected = losses["loss_base"] + rot_weight * losses["loss_rot"]
            assert torch.allclose(losses["loss"], expected)
            assert losses["loss_rot"] > 2 * math.log(4) * 0.5  # a sum of two CEs near log 4 each at init
        if base == "byol":  # the target sees the unrotated global views, once
            assert len(calls["target"]) == 1 and torch.equal(calls["target"][0], globals_)


# ---------------------------------------------------------------------------- SwAV
def test_sinkhorn_codes_are_assignments_with_uniform_prototype_marginals():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(256, 16), dim=1)
    prototypes = F.normalize(torch.randn(8, 16), dim=1)
    codes = rotssl.sinkhorn_codes(z @ prototypes.t(), eps=0.05, iters=3)
    assert codes.shape == (256, 8) and (codes >= 0).all()
    assert torch.allclose(codes.sum(1), torch.ones(256), atol=1e-5)  # each sample: a distribution
    # each prototype gets about B / K samples: roughly after the 3 iterations of the recipe (far closer
    # than the plain softmax of the same scores), and exactly when the iterations are run to convergence
    def deviation(c):
        return (c.sum(0) / (256 / 8) - 1).abs().max().item()
    assert deviation(codes) < 0.3
    assert deviation(codes) < 0.7 * deviation(F.softmax(z @ prototypes.t() / 0.05, dim=1))
    assert deviation(rotssl.sinkhorn_codes(z @ prototypes.t(), eps=0.05, iters=50)) < 1e-3


def test_swav_loss_equals_a_hand_computed_value():
    # 3 crops, 1 sample, 2 prototypes, temperature 0.1: scores / T are [1, 0], [0, 0] and [2, 0]
    scores = torch.tensor([[[0.1, 0.0]], [[0.0, 0.0]], [[0.2, 0.0]]])
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    e1, e2 = math.log(math.e + 1), math.log(math.e ** 2 + 1)
    from_crop0 = (math.log(2) + (e2 - 2)) / 2  # code [1, 0] predicted by crops 1 and 2
    from_crop1 = ((2 * e1 - 1) / 2 + (2 * e2 - 2) / 2) / 2  # code [.5, .5] predicted by crops 0 and 2
    expected = (from_crop0 + from_crop1) / 2
    assert rotssl.swav_loss(scores, codes, temperature=0.1).item() == pytest.approx(expected, rel=1e-5)


def _sinkhorn_worker(rank, world, port, scores, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = scores.chunk(world)[rank]
        torch.save(rotssl.sinkhorn_codes(mine, 0.05, 3), os.path.join(out, f"codes{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_sinkhorn_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(32, 16), dim=1) @ F.normalize(torch.randn(12, 16), dim=1).t()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sinkhorn_worker, args=(2, port, scores, str(tmp_path)), nprocs=2)
    gathered = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    single = rotssl.sinkhorn_codes(scores, 0.05, 3)
    assert torch.allclose(gathered, single, rtol=1e-5, atol=1e-7)
    # and the halves alone (no all-reduce) would give other codes: the test can tell
    assert not torch.allclose(torch.cat([rotssl.sinkhorn_codes(h, 0.05, 3) for h in scores.chunk(2)]), single,
                              rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------- BYOL
def test_byol_loss_is_0_for_identical_and_4_per_pair_for_opposite_vectors():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    assert rotssl.byol_loss(a, b, b, a).item() == pytest.approx(0.0, abs=1e-6)  # p1 = z2, p2 = z1
    assert rotssl.byol_loss(a, b, -b, a).item() == pytest.approx(4.0, abs=1e-5)  # one pair opposite
    assert rotssl.byol_loss(a, b, -b, -a).item() == pytest.approx(8.0, abs=1e-5)  # both: summed
    assert rotssl.byol_loss(3 * a, b, b, a).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant


def test_byol_target_is_a_frozen_momentum_average_of_the_online_networks():
    torch.manual_seed(0)
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 16)
    model = rotssl.RotSSL(backbone, feat_dim, "byol", 0.1)
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    assert not any(p.requires_grad for p in target)  # trained only through the momentum update
    assert all(torch.equal(t, o) for t, o in zip(target, online))  # starts as a copy
    before = [t.clone() for t in target]
    with torch.no_grad():
        for p in [*online, *model.predictor.parameters()]:
            p.add_(torch.randn_like(p))
    model.momentum_update(0.9)
    for t, t0, o in zip(target, before, online):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o, atol=1e-6)


# ---------------------------------------------------------------------------- the script
def test_demo_path_runs_and_logs_the_rotation_task(tmp_path):
    out = tmp_path / "demo"
    result = run_script("rotssl.py", "--epochs", "1", "--subset", "256", "--workers", "1", "--out", out)
    assert "kNN top-1" in result.stdout and "at random init" in result.stdout
    header, init, epoch = read_log(out)
    assert header["args"]["base"] == "swav" and header["args"]["n_prototypes"] == 32  # min(300, batch 32)
    assert init["epoch"] == 0 and "knn_top1" in init
    for key in ("loss", "loss_base", "loss_rot", "rot_acc", "lr", "images_per_s", "peak_mem_mb", "knn_top1"):
        assert math.isfinite(epoch[key]), key
    record = common.load_backbone(str(out / "backbone.pt"))
    assert record["method"] == "rotssl-swav" and record["img_size"] == 32
    common.backbone_from_record(record)


def test_byol_base_trains_a_momentum_target(tmp_path):
    out = tmp_path / "byol"
    run_script("rotssl.py", "--base", "byol", *TINY, "--out", out)
    logs = read_log(out)[1:]
    assert [r["epoch"] for r in logs] == [1, 2]
    assert all(0 <= r["rot_acc"] <= 100 and r["loss"] > r["loss_base"] for r in logs)
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    target = {k[len("target_backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("target_backbone.")}
    online = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    assert target.keys() == online.keys()
    weights = [k for k in online if k.endswith("weight")]
    # the target trails the online network (momentum < 1), so the two differ
    assert any(not torch.equal(online[k], target[k]) for k in weights)
    assert "rotation_head.0.weight" in ckpt["model"] and "prototypes.weight" not in ckpt["model"]
    # small images get BYOL's CIFAR recipe: lr 1.0 per 256 under LARS with eta 0.02, clipped
    assert read_log(out)[0]["args"]["lr"] == 1.0
    lars = ckpt["optimizer"]["param_groups"][0]
    assert lars["trust_coefficient"] == 0.02 and lars["clip"] and not lars["lars_exclude"]


@pytest.mark.parametrize("base", ["swav", "byol"])
def test_two_processes_complete(tmp_path, base):
    out = tmp_path / base
    run_script("rotssl.py", "--base", base, *TINY, "--epochs", "1", "--out", out, nproc=2)
    assert read_log(out)[-1]["epoch"] == 1 and (out / "backbone.pt").exists()


def test_exact_resume_after_a_crash(tmp_path):
    # prototypes frozen for 10 iterations: the freeze spans the first checkpoint (8 steps per epoch)
    args = [*TINY, "--freeze-prototypes-iters", "10"]
    run_script("rotssl.py", *args, "--out", tmp_path / "straight")
    first = run_killed_after_first_checkpoint("rotssl.py", *args, out=tmp_path / "resumed")
    assert first["epoch"] == 1 and first["step"] == 8
    # prototypes: l2-normalised before each step, and no gradient while frozen (steps 0 to 9), so the
    # optimizer has no state for them yet at the first checkpoint, and has at the end
    n_params = sum(len(group["params"]) for group in first["optimizer"]["param_groups"])
    assert len(first["optimizer"]["state"]) == n_params - 1
    assert torch.allclose(first["model"]["prototypes.weight"].norm(dim=1), torch.ones(32), atol=1e-6)
    run_script("rotssl.py", *args, "--out", tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert_same_state(a["model"], b["model"])
    assert len(a["optimizer"]["state"]) == n_params
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    # eval_linear.py reads the backbone.pt of the run
    run_script("eval_linear.py", "--ckpt", tmp_path / "resumed" / "backbone.pt", "--data", "synthetic",
               "--subset", "500", "--workers", "0", "--epochs", "5")
    result = json.loads((tmp_path / "resumed" / "eval_synthetic.json").read_text())
    assert 0 <= result["knn"]["top1"] <= 100 and 0 <= result["linear"]["top1"] <= 100


def test_byol_exact_resume_after_a_crash(tmp_path):
    """The BYOL base resumes exactly too: target network, tau schedule position, optimizer state."""
    args = ["--base", "byol", *TINY]
    run_script("rotssl.py", *args, "--out", tmp_path / "straight")
    first = run_killed_after_first_checkpoint("rotssl.py", *args, out=tmp_path / "resumed")
    assert first["epoch"] == 1
    run_script("rotssl.py", *args, "--out", tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and any(k.startswith("target_backbone.") for k in a["model"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])


@pytest.mark.parametrize("flag, value", [("--rot-weight", "-0.1")])
def test_bad_flag_exits_with_one_sentence_and_no_output(tmp_path, flag, value):
    out = tmp_path / "bad"
    result = run_script("rotssl.py", flag, value, "--out", out, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and flag in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
