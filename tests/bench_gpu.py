"""GPU benchmark of every method: images/s, data_wait, peak memory and a step's cost against the backbone's own.

One command, no dataset, sized for under 8 minutes on one GPU (not yet run on one). In a temporary folder it writes
an ImageFolder of ImageNet-sized JPEGs (scenes of common.Synthetic's shapes on textures, 500 x 375 px, 8 classes;
their boxes in a --boxes file for univip.py), then:
  - runs every method as a user launches it (t-ReX, OPERA, SwAV + rotation, BYOL + rotation, UniVIP on the scenes),
    two epochs each, with resnet50, bf16 autocast, channels_last (the scripts' own on CUDA), the papers' 224 / 96 px
    crops and a loader worker per free core, and reads the last epoch's images/s, data_wait and peak GPU memory from
    its log.jsonl (the first epoch warms up: cuDNN's autotuner, the allocator, torch.compile);
  - sets each step (wall time, data waits included) against the bare backbone's forward and backward on the same
    batch's global crops, timed here: the method's cost in plain supervised steps;
  - times each augmentation's device half (common.ColorAugmentation's colour operations, the rotations) on one batch
    in pinned memory, as the loaders hand it over;
  - runs OPERA again under `torchrun --nproc_per_node=1` with `--compile` (--quick: without; TorchInductor's build
    takes minutes on a small CPU), then `pytest tests/test_cuda.py`;
and prints a Markdown table under the GPU's name, the torch and CUDA versions and the CPU cores used. Run from the
repository root (no test_ prefix: pytest does not collect it; tests/test_bench_gpu.py runs --quick):

    python tests/bench_gpu.py            # one CUDA GPU: 4,000 JPEGs, batch 128
    python tests/bench_gpu.py --quick    # the same code on the CPU: resnet_tiny, fp32, 64 x 48 px images, 32 px crops
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402  (the repository's own module)
from bench_input import cpu_name, pipelines  # noqa: E402  (each method's augmentation at given crop sizes)

METHODS = {  # key of bench_input.pipelines: (the table's row, the script and its own flags)
    "trex": ("t-ReX (`trex.py`)", ["trex.py"]),
    "opera": ("OPERA (`opera.py`)", ["opera.py"]),
    "swav_rot": ("SwAV + rotation (`rotssl.py`)", ["rotssl.py"]),
    "byol_rot": ("BYOL + rotation (`rotssl.py --base byol`)", ["rotssl.py", "--base", "byol"]),
    "univip": ("UniVIP on scenes (`univip.py --boxes`)", ["univip.py"]),
}
COMPILED = "opera"  # the method also run under torchrun with --compile: one crop size, tensors-only forward
MODES = {  # GPU: the paper's crops on ImageNet-sized images; quick: the CPU demo's network on tiny ones
    "gpu": dict(arch="resnet50", precision="bf16", image=(500, 375), crops=(224, 96), min_box=64, images=4000,
                batch_size=128, reps=20),
    "quick": dict(arch="resnet_tiny", precision="fp32", image=(64, 48), crops=(32, 16), min_box=8, images=64,
                  batch_size=16, reps=3),
}
CLASSES = 8


def get_args(argv=None):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the same code on the CPU: resnet_tiny, fp32, 64 x 48 px images, 32 / 16 px crops, 64 "
                             "images, batch 16 (a check that the benchmark runs)")
    parser.add_argument("--images", type=int, default=None, help="JPEGs to write (default: 4000; --quick 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch of every run (default: 128; --quick 16)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run; the table reports the last one")
    parser.add_argument("--workers", type=int, default=max(1, cores - 1),
                        help="loader processes of each run (default: the cores this process may use, less one)")
    parser.add_argument("--pytest-timeout", type=float, default=240,
                        help="seconds allowed to `pytest tests/test_cuda.py` (0: do not run it)")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "gpu"]
    args.images, args.batch_size = args.images or mode["images"], args.batch_size or mode["batch_size"]
    args.cores, args.mode = cores, SimpleNamespace(**mode)
    if not args.quick and not torch.cuda.is_available():
        raise common.UserError("tests/bench_gpu.py measures a CUDA GPU and none is visible here; "
                               "run `python tests/bench_gpu.py --quick` to check it on the CPU")
    if args.batch_size < 2 or args.images < args.batch_size or args.epochs < 1 or args.workers < 0:
        raise common.UserError("--batch-size must be at least 2 (batch norm), --images at least --batch-size, "
                               "--epochs at least 1 and --workers not negative")
    return args


# ----------------------------------------------------------------------------------------------
# The fake ImageFolder
# ----------------------------------------------------------------------------------------------
def _write_images(root, indices, size):
    """Writes scenes `indices` into root/train/<class>/; returns {path relative to root/train: boxes}."""
    side = min(128, max(size))  # drawn at this side, then resized: rendering a 500 px scene takes 10x longer
    scenes, scale = common.Synthetic(scenes=True, img_size=side, boxes_only=True), np.array(size * 2) / side
    rng, boxes = np.random.default_rng(indices[0]), {}
    for i in indices:
        image, scene_boxes = scenes[i]
        pixels = np.asarray(image.resize(size, Image.BICUBIC), np.int16)
        grain = rng.integers(-20, 21, (size[1], size[0], 1), dtype=np.int16)  # a photo's file size and decode time
        rel = f"class_{i % CLASSES}/{i:05d}.jpg"
        Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)).save(
            os.path.join(root, "train", rel), quality=90)
        boxes[rel] = [[round(float(v), 1) for v in box * scale] for box in scene_boxes]  # x, y, w, h
    return boxes


def write_dataset(root, count, size, processes):
    """`count` JPEGs of `size` (w, h) in root/train/class_k/ and root/boxes.json (univip.py's --boxes: each image's
    shapes as [x, y, w, h]), written by `processes` processes."""
    for k in range(CLASSES):
        os.makedirs(os.path.join(root, "train", f"class_{k}"), exist_ok=True)
    chunks = [list(c) for c in np.array_split(np.arange(count), max(1, min(processes, count // 8))) if len(c)]
    with concurrent.futures.ProcessPoolExecutor(len(chunks)) as pool:  # before any CUDA call: workers fork
        boxes = {}
        for part in pool.map(_write_images, [root] * len(chunks), [[int(i) for i in c] for c in chunks],
                             [tuple(size)] * len(chunks)):
            boxes.update(part)
    with open(os.path.join(root, "boxes.json"), "w") as f:
        json.dump(boxes, f)
    return boxes


# ----------------------------------------------------------------------------------------------
# The methods' runs, as a user launches them
# ----------------------------------------------------------------------------------------------
def launch(cmd, timeout, threads=None):
    """Run `cmd` in the repository in a session of its own, with `threads` OpenMP threads if given. Returns (return
    code or None on a timeout, stdout, stderr). On a timeout or Ctrl-C (which reaches this process only) the session
    gets SIGTERM, which torchrun passes on to its worker (in a session of its own), then SIGKILL a minute later."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": str(threads)} if threads else {})
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except BaseException as e:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, err = proc.communicate(timeout=wait)
                break
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return None, out, err


def method_command(key, root, out, args, torchrun=False, compile=False):
    """The command line of one method's run on the fake folder at the mode's sizes."""
    m, (g, l) = args.mode, args.mode.crops
    script, *own = METHODS[key][1]
    sizes = {"opera.py": ["--crop-size", g],
             "univip.py": ["--scene-size", g, "--instance-size", l, "--min-box", m.min_box]}.get(
        script, ["--global-size", g, "--local-size", l])
    data = (["--data", os.path.join(root, "train"), "--boxes", os.path.join(root, "boxes.json")]
            if script == "univip.py" else ["--data", root])
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun
                else [sys.executable])
    return launcher + [script, *own, *data, *map(str, sizes), "--arch", m.arch, "--precision", m.precision,
                       "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--eval-every", "0",
                       "--workers", str(args.workers), "--out", out] + (["--compile"] if compile else [])


def run_method(cmd, out, timeout, threads=None):
    """Runs a method; returns the last epoch's line of its log.jsonl, or {"error": the reason in one line}."""
    code, _, err = launch(cmd, timeout, threads)
    if code != 0:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        why = f"timed out after {timeout:.0f} s" if code is None else (lines or [f"exit status {code}"])[-1]
        print(f"{' '.join(cmd)}\n  failed: {why}; its last lines:\n" + "\n".join(lines[-25:]), file=sys.stderr)
        return {"error": why.replace("|", "/")[:160]}  # a cell of the table
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


# ----------------------------------------------------------------------------------------------
# Timings in this process: the backbone's own step, each augmentation's device half
# ----------------------------------------------------------------------------------------------
def milliseconds(fn, device, reps, warmup=2):
    """Mean wall time of fn() over `reps` calls after `warmup` ones; the GPU's queue drained around the clock."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start) / reps


def backbone_ms(args, device, small):
    """Forward and backward of the bare backbone on one batch of global crops, as the scripts run it (to_device:
    channels_last on CUDA; the mode's autocast): the cost of a plain supervised step, the table's unit."""
    m, size = args.mode, args.mode.crops[0]
    model = common.to_device(common.build_backbone(m.arch, small, size)[0], device).train()
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = common.mixed_precision(m.precision, device)[0]

    def step():
        with autocast():
            features = model(images)
        features.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return milliseconds(step, device, m.reps)


def pinned(batch):
    """The batch in page-locked memory, as the training loaders hand it over on CUDA (pin_memory=True)."""
    if torch.is_tensor(batch):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pinned(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pinned(v) for v in batch)
    return batch


def colour_ms(args, device, small, folder, boxes):
    """key: (crops per image, ms of the augmentation's device half on one batch made from 16 of the fake images, or
    None where it failed: the traceback is printed and the other methods still timed)."""
    g, l = args.mode.crops
    times, images = {}, [(common.load_rgb(os.path.join(folder, rel)), np.array(boxes[rel], np.float32).reshape(-1, 4))
                         for rel in sorted(boxes)[:16]]
    for key, (label, worker, collate, device_half) in pipelines(device, g, l, args.mode.min_box, small).items():
        if key in METHODS:
            torch.manual_seed(0)
            batch = collate([worker(*images[i % len(images)]) for i in range(args.batch_size)])
            batch = pinned(batch) if device.type == "cuda" else batch
            times[key] = (label.split(", ", 1)[1], guarded(milliseconds, lambda: device_half(batch), device,
                                                           args.mode.reps))
    return times


def guarded(fn, *args):
    """fn(*args), or None with the traceback printed: on a GPU's first run, one failure must not hide the rest."""
    try:
        return fn(*args)
    except Exception:
        traceback.print_exc()
        return None


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def table_rows(results, colour, unit_ms, args, gpu):
    """Markdown rows: (row, crops, images/s, data_wait, peak GPU memory, step, x backbone, colour ops per batch)."""
    rows = []
    for key, label, stats in results:
        crops, ms = colour[key]
        colour_of = "-" if label != METHODS[key][0] else "failed" if ms is None else f"{ms:.1f} ms"
        if "error" in stats:
            rows.append([label, crops, f"failed: {stats['error']}", "-", "-", "-", "-", colour_of])
            continue
        step = 1000 * args.batch_size / stats["images_per_s"]  # wall time per step, data waits included
        memory = f"{stats['peak_mem_mb'] / 1024:.1f} GB" if gpu else "n/a"
        rows.append([label, crops, f"{stats['images_per_s']:,.0f}", f"{stats['data_wait']:.0%}", memory,
                     f"{step:.0f} ms", "failed" if unit_ms is None else f"{step / unit_ms:.1f}x", colour_of])
    return rows


def print_table(rows):
    header = ["run", "crops per image", "images/s", "data_wait", "peak GPU memory", "step", "x backbone",
              "colour ops per batch"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def pytest_summary(timeout):
    """The summary line of `pytest tests/test_cuda.py` (its last line), or why there is none."""
    code, out, err = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                            timeout)
    if code is None:
        return f"timed out after {timeout:.0f} s"
    lines = [line.strip("= ") for line in (out + err).splitlines() if line.strip("= ")]
    if code != 0:
        print(out[-5000:] + err[-3000:], file=sys.stderr)
    return lines[-1] if lines else f"exit status {code}, no output"


def main(argv=None):
    args = get_args(argv)
    m, gpu, start = args.mode, not args.quick, time.perf_counter()
    note = lambda what: print(f"[{time.perf_counter() - start:4.0f} s] {what}", file=sys.stderr, flush=True)
    small = min(m.image) <= common.SMALL_IMAGES  # what the scripts' crop_sizes decides from these images
    threads = None if gpu else 1  # --quick: one thread a process, OpenMP's spinning stalls a shared 2-core machine
    if threads:
        torch.set_num_threads(threads)
    # every method, then the compiled one under torchrun (on the CPU TorchInductor's build takes minutes: not --quick)
    runs = [(key, label, False, False) for key, (label, _) in METHODS.items()] + [
        (COMPILED, METHODS[COMPILED][0].split(" (")[0] + ", `torchrun --nproc_per_node=1`" + ", `--compile`" * gpu,
         True, gpu)]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = os.path.join(tmp, "data")
        boxes = write_dataset(root, args.images, m.image, args.cores)
        note(f"wrote {args.images} JPEGs of {m.image[0]} x {m.image[1]} px and their boxes")
        device = common.init_distributed().device  # the scripts' device set-up: TF32, cuDNN's autotuner
        unit_ms = guarded(backbone_ms, args, device, small)
        colour = colour_ms(args, device, small, os.path.join(root, "train"), boxes)
        if gpu:
            torch.cuda.empty_cache()  # the runs are processes of their own: leave them the memory
        note("timed the backbone alone and the colour operations")
        results = []
        for i, (key, label, torchrun, compiled) in enumerate(runs):
            out = os.path.join(tmp, f"run{i}")
            stats = run_method(method_command(key, root, out, args, torchrun, compiled), out,
                               420 if compiled else 240, threads)
            results.append((key, label, stats))
            note(f"{label}: " + stats.get("error", f"{stats.get('images_per_s', 0):.0f} images/s"))
    tests = pytest_summary(args.pytest_timeout) if args.pytest_timeout > 0 else None

    machine = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN "
               f"{torch.backends.cudnn.version()}" if gpu else "no GPU (--quick, on the CPU)")
    print(f"\n{machine}, torch {torch.__version__}; {args.cores} CPU cores ({cpu_name()}), loader workers per "
          f"run: {args.workers}")
    backbone = f"{unit_ms:.1f} ms" if unit_ms else "failed"
    print(f"{m.arch}, {m.precision}" + ", channels_last" * gpu + f", batch {args.batch_size}, epoch {args.epochs} "
          f"of {args.epochs} over {args.images:,} JPEGs of {m.image[0]} x {m.image[1]} px. data_wait includes the "
          f"loaders' start of each epoch; step: wall time a step, data waits included; x backbone: over the bare "
          f"{m.arch}'s forward and backward on the batch's global crops ({backbone}); colour ops: the augmentation's "
          f"device half on one batch\n")
    print_table(table_rows(results, colour, unit_ms, args, gpu))
    print(f"\ntests/test_cuda.py: {tests or 'not run (--pytest-timeout 0)'}")
    print(f"total: {time.perf_counter() - start:.0f} s")
    failed = unit_ms is None or None in [ms for _, ms in colour.values()] or any(
        "error" in stats for _, _, stats in results)
    if failed or tests is not None and (re.search(r"\b(failed|error)", tests) or
                                        not re.search(r"\b(passed|skipped)\b", tests)):
        sys.exit(1)


if __name__ == "__main__":
    common.run_main(main)
