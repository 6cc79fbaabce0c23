"""Benchmark of the input pipeline at ImageNet sizes: worker images/s per core and the device half's cost.

For each method's augmentation this measures, on one thread:
  - the worker half (decode, crops, flips, boxes, rotation labels) on 500 x 375 JPEGs, ImageNet's
    typical size, made once from CIFAR-10 images upscaled with bicubic interpolation; decode included;
  - the device half (the batched colour operations and normalisation) on a collated batch, with the
    CPU standing in for the training device (on a GPU it is a few elementwise kernels per view).
Not collected by pytest (no test_ prefix). Run from the repository root:

    python tests/bench_input.py                 # 10 s per pipeline, device half on 64 images (about 2 minutes)
    python tests/bench_input.py --quick         # 1 s per pipeline, device half on 8 images: checks that it runs
"""
import argparse
import glob
import os
import platform
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import cifar10_jpeg, common, opera, rotssl, trex, univip  # noqa: E402  (the repository's own modules)

BOXES = np.array([[20, 20, 200, 150], [250, 30, 220, 180], [40, 200, 180, 160], [260, 210, 200, 150]], np.float32)


def get_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="time spent on each pipeline's worker half")
    parser.add_argument("--batch", type=int, default=64, help="images in the batch of the device half")
    parser.add_argument("--images", type=int, default=200, help="number of 500 x 375 JPEGs to make and cycle over")
    parser.add_argument("--quick", action="store_true", help="--seconds 1 --batch 8: a check that it runs")
    parser.add_argument("--cifar", default=os.path.join(REPO, "data", "cifar10"),
                        help="CIFAR-10 ImageFolder (train/<class>/*.jpg); made by tests/cifar10_jpeg.py if missing")
    parser.add_argument("--tarball", default=None, help="offline, for the project's tests: a tarball of that folder to "
                        "extract if it is missing (default: none, torchvision's download into data/)")
    parser.add_argument("--jpeg-dir", default=os.path.join(REPO, "data", "bench_jpeg"),
                        help="where the upscaled JPEGs are written (reused when present)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.batch = 1.0, 8
    return args


def make_jpegs(args):
    """--images CIFAR-10 training images, every 250th, upscaled to 500 x 375 and saved at JPEG quality 90."""
    paths = sorted(glob.glob(os.path.join(args.jpeg_dir, "*.jpg")))
    if len(paths) >= args.images:
        return paths[:args.images]
    if not glob.glob(os.path.join(args.cifar, "train", "*", "*.jpg")):
        cifar10_jpeg.make(args.cifar, os.path.join(REPO, "data"), args.tarball)
    sources = sorted(glob.glob(os.path.join(args.cifar, "train", "*", "*.jpg")))[::250][:args.images]
    os.makedirs(args.jpeg_dir, exist_ok=True)
    for i, path in enumerate(sources):
        Image.open(path).convert("RGB").resize((500, 375), Image.BICUBIC).save(
            os.path.join(args.jpeg_dir, f"{i:03d}.jpg"), quality=90)
    return sorted(glob.glob(os.path.join(args.jpeg_dir, "*.jpg")))[:args.images]


def pipelines(device=torch.device("cpu"), global_size=224, local_size=96, min_box=64, small=False):
    """key: (label, worker half: (decoded image, its boxes) -> sample, collate, device half: batch -> views on
    `device`), each method's augmentation at these crop sizes (bench_gpu.py times the device half on a GPU)."""
    g, l = global_size, local_size
    two_view = opera.TwoViewAugmentation(g, 0.08, small)
    scenes = univip.SceneInstanceAugmentation(g, l, 4, min_box, (0.08, 1.0), small=small)
    byol = rotssl.Augmentation("byol", g, l, 0, rotate=True, small=small)
    swav = rotssl.Augmentation("swav", g, l, 6, rotate=True, small=small)
    multi_crop = trex.MultiCropAugmentation(g, l, 8, small=small)
    return {
        "decode": ("JPEG decode alone", lambda im, boxes: im, None, None),
        "opera": (f"opera.py, 2 x {g}", lambda im, boxes: two_view(im, 0), default_collate,
                  lambda b: two_view.on_device(*b[:2], device)),
        "byol_rot": (f"rotssl.py --base byol, 2 x {g} + rotations", lambda im, boxes: byol(im), default_collate,
                     lambda b: byol.on_device(b, device)),
        "swav_rot": (f"rotssl.py (SwAV), 2 x {g} + 6 x {l} + rotations", lambda im, boxes: swav(im),
                     default_collate, lambda b: swav.on_device(b, device)),
        "trex": (f"trex.py, 1 x {g} + 8 x {l}", lambda im, boxes: multi_crop(im, 0), default_collate,
                 lambda b: multi_crop.on_device(b[0], device)),
        "univip": (f"univip.py, 2 x {g} + 2 x 4 x {l}", scenes, univip.collate_scene_pairs,
                   lambda b: scenes.on_device(*b[:4], device)),
    }


def cpu_name():
    """The model name of the CPU (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    args = get_args()
    torch.set_num_threads(1)
    paths = make_jpegs(args)
    print(f"input pipeline benchmark: {len(paths)} JPEGs of 500 x 375 px, one thread, {args.seconds:g} s per "
          f"pipeline, device half on {args.batch} images on the CPU")
    print(f"CPU: {cpu_name()}, torch {torch.__version__}")
    device_column = f"device half, CPU, ms per {args.batch}"
    print(f"{'pipeline':<48}{'worker images/s per core':>26}{device_column:>30}", flush=True)
    for name, worker, collate, device in pipelines().values():
        torch.manual_seed(0)
        samples, start = [], time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for path in paths:
                samples.append(worker(common.load_rgb(path), BOXES))
                if len(samples) >= args.batch and time.perf_counter() - start >= args.seconds:
                    break
        rate = len(samples) / (time.perf_counter() - start)
        ms = "-"
        if device is not None:
            batch = samples[:args.batch]
            device(collate(batch))  # warm-up
            start = time.perf_counter()
            device(collate(batch))
            ms = f"{1000 * (time.perf_counter() - start):.0f}"
        print(f"{name:<48}{rate:>26.0f}{ms:>30}", flush=True)


if __name__ == "__main__":
    common.run_main(main)
