"""Shared test fixtures: the repository path, script runners, the log reader and the CIFAR-10 folder."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
sys.path.insert(0, str(REPO))
import common  # noqa: E402  (the repository's, above)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use tiny tensors: one thread avoids OpenMP's overhead on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def colour_aug(**values):
    """common.ColorAugmentation with BYOL's view-1 values (jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, sigma 0.1
    to 2) and no blur or solarize, unless `values` say otherwise."""
    byol = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0, sigma=(0.1, 2.0), solarize_p=0.0)
    return common.ColorAugmentation(**{**byol, **values})


def read_log(out):
    """The records of OUT/log.jsonl: the header (arguments, versions) first, then one per epoch."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def script_env():
    """One thread per process keeps two-process runs from fighting over the two cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def save_backbone(path, backbone, **fields):
    """Write backbone.pt as a training run does: common.backbone_record (fields: see there), saved atomically."""
    import common
    common.atomic_save(common.backbone_record(backbone, **fields), path)


def run_script(script, *args, nproc=1, timeout=300, check=True, torchrun=False):
    """Run `python script args` (or torchrun with `nproc` processes, also for one with `torchrun`) in the
    repository; returns the result."""
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, str(REPO / script), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / script), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def run_killed_after_first_checkpoint(script, *args, out, timeout=300):
    """Start a run and SIGKILL it as soon as its first checkpoint.pt exists (a crash mid-training)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline = Path(out) / "checkpoint.pt", time.time() + timeout
    while proc.poll() is None and not ckpt.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
    proc.kill()
    proc.wait()
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def assert_same_state(a, b, prefix=""):
    """Every tensor of two (nested) state dicts is bitwise equal."""
    assert type(a) is type(b), f"{prefix}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{prefix}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{prefix}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), prefix
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{prefix}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{prefix} differs"
    else:
        assert a == b, f"{prefix}: {a} vs {b}"


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """CIFAR-10 as an ImageFolder (train/, test/), extracted once per session; skipped when absent."""
    if not CIFAR_TARBALL.exists():
        pytest.skip(f"{CIFAR_TARBALL} not found (only on the project's machines)")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_TARBALL) as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10"


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env.get(b"RANK", b"-1"))


def run_signalled_mid_epoch(script, *args, out, after_steps=3, sig=signal.SIGTERM, nproc=1, rank=0, timeout=300):
    """Start a run, send `sig` once its progress bar shows `after_steps` steps of the first epoch (to the
    process of `rank` only under torchrun), and wait for it to stop. Returns (returncode, stderr)."""
    cmd = ([sys.executable, str(REPO / script)] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / script)]) + [*map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, sent, deadline = b"", False, time.time() + timeout
    while time.time() < deadline:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        done = [int(m) for m in re.findall(rb"epoch 1/\d+:.*?\| *(\d+)/\d+", seen[-4000:])]
        if not sent and done and max(done) >= after_steps:
            if nproc == 1:
                proc.send_signal(sig)
            else:  # one worker only: the others must learn of it and stop at the same step
                os.kill(next(p for p in _children(proc.pid) if _rank_of(p) == rank), sig)
            sent = True
    proc.wait(timeout=max(1, deadline - time.time()))
    assert sent, f"the run ended before it could be signalled: {seen.decode()[-2000:]}"
    return proc.returncode, seen.decode(errors="replace")


def assert_bf16_run_close_to_fp32(script, *args, out, fp32_out=None, rel=0.1):
    """A short run under `--precision bf16` (CPU autocast) ends with a finite loss that differs from the
    same run in fp32 (so autocast was on) by less than `rel` of it (so it computes the same thing), and logs
    images/s and data_wait. `fp32_out`: a finished fp32 run with the same args, if a fixture has one."""
    if fp32_out is None:
        fp32_out = Path(out).with_name(Path(out).name + "_fp32")
        run_script(script, *args, "--precision", "fp32", "--out", fp32_out)
    run_script(script, *args, "--precision", "bf16", "--out", out)
    bf16, fp32 = read_log(out), read_log(fp32_out)
    assert bf16[0]["args"]["precision"] == "bf16"
    a, b = bf16[-1]["loss"], fp32[-1]["loss"]
    assert math.isfinite(a) and a != b and abs(a - b) < rel * abs(b), (a, b)
    assert bf16[-1]["images_per_s"] > 0 and 0 <= bf16[-1]["data_wait"] <= 1
