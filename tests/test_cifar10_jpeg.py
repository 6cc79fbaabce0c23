"""tests/cifar10_jpeg.py: torchvision's CIFAR-10 (a small fake of it here: no download) to the JPEG ImageFolder the
results and benchmark scripts read, laid out and encoded as the tests' tarball; the tarball as the offline path."""
import io
import os
import sys
import tarfile

import numpy as np
import pytest
import torchvision
from PIL import Image, JpegImagePlugin

import common
from conftest import CIFAR_TARBALL, REPO

sys.path.insert(0, str(REPO / "tests"))
import cifar10_jpeg  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class FakeCIFAR10:
    """torchvision.datasets.CIFAR10's interface: 32 px PIL images, labels in a mixed order, `classes`."""
    calls = []

    def __init__(self, root, train=True, download=False):
        FakeCIFAR10.calls.append((root, train, download))
        self.classes = CLASSES
        rng = np.random.default_rng(int(train))
        self.labels = rng.permutation(np.repeat(np.arange(10), 3 if train else 1)).tolist()
        blocks = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in self.labels]  # smooth: JPEG keeps them
        self.images = [b.repeat(8, axis=0).repeat(8, axis=1) for b in blocks]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if i >= len(self):
            raise IndexError(i)
        return Image.fromarray(self.images[i]), self.labels[i]


class Split(list):
    """A dataset as export() reads it: (PIL image, label) pairs, and the class names."""

    def __init__(self, items, classes):
        super().__init__(items)
        self.classes = classes


def test_export_writes_the_tarballs_layout(tmp_path, monkeypatch):
    FakeCIFAR10.calls.clear()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    out = tmp_path / "data" / "cifar10"
    cifar10_jpeg.make(str(out), str(tmp_path / "data"))
    assert FakeCIFAR10.calls[-2:] == [(str(tmp_path / "data"), True, True), (str(tmp_path / "data"), False, True)]
    assert sorted(os.listdir(out)) == ["test", "train"] and sorted(os.listdir(tmp_path / "data")) == ["cifar10"]
    for split, per_class in (("train", 3), ("test", 1)):
        fake = FakeCIFAR10(None, train=split == "train")
        assert sorted(os.listdir(out / split)) == CLASSES
        for label, name in enumerate(CLASSES):
            files = sorted(os.listdir(out / split / name))
            assert files == [f"{k:04d}.jpg" for k in range(per_class)]
            originals = [image for image, y in zip(fake.images, fake.labels) if y == label]  # the dataset's order
            for k, file in enumerate(files):  # file k is the class's k-th image: near it, far from the others
                written = Image.open(out / split / name / file)
                errors = [np.abs(np.asarray(written.convert("RGB"), np.float32) - o).mean() for o in originals]
                assert written.size == (32, 32) and np.argmin(errors) == k and errors[k] < 20
    dataset = common.build_dataset(str(out), "val")  # test/ read as the validation split, as the scripts do
    assert len(dataset) == 10 and dataset.classes == CLASSES and sorted(dataset.labels) == list(range(10))
    cifar10_jpeg.make(str(out), str(tmp_path / "data"))  # there already: nothing done
    assert len(FakeCIFAR10.calls) == 4  # make()'s two and the loop's two: the second make() read nothing


def test_export_encodes_as_the_tarball(tmp_path):
    """export() writes with the tarball's JPEG quantisation tables and chroma subsampling (quality 75, 4:2:0)."""
    if not CIFAR_TARBALL.exists():
        pytest.skip(f"{CIFAR_TARBALL} not found")
    with tarfile.open(CIFAR_TARBALL) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        theirs = Image.open(io.BytesIO(tar.extractfile(member).read()))
        theirs.load()
    one = Split([(theirs.convert("RGB"), 0)], ["cat"])
    cifar10_jpeg.export(one, one, str(tmp_path / "cifar10"))
    ours = Image.open(tmp_path / "cifar10" / "train" / "cat" / "0000.jpg")
    assert ours.quantization == theirs.quantization
    assert JpegImagePlugin.get_sampling(ours) == JpegImagePlugin.get_sampling(theirs) == 2  # 4:2:0


def test_failures_leave_nothing(tmp_path, monkeypatch):
    class NoNetwork(FakeCIFAR10):
        def __init__(self, root, train=True, download=False):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    with pytest.raises(common.UserError, match="could not get CIFAR-10 into .*OSError"):
        cifar10_jpeg.make(str(tmp_path / "cifar10"), str(tmp_path))

    class Broken(FakeCIFAR10):
        def __getitem__(self, i):
            if i == 7:
                raise ValueError("a damaged image")
            return super().__getitem__(i)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Broken)
    with pytest.raises(ValueError):
        cifar10_jpeg.make(str(tmp_path / "cifar10"), str(tmp_path))
    assert os.listdir(tmp_path) == []  # no half-written folder, no temporary one


def test_offline_tarball(tmp_path):
    source = tmp_path / "src" / "cifar10"
    for split in ("train", "test"):
        (source / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32), (10, 20, 30)).save(source / split / "cat" / "0000.jpg", quality=75)
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="cifar10")
    cifar10_jpeg.make(str(tmp_path / "data" / "cifar10"), tarball=str(tmp_path / "c.tar.gz"))
    assert os.listdir(tmp_path / "data") == ["cifar10"]
    assert os.listdir(tmp_path / "data" / "cifar10" / "test" / "cat") == ["0000.jpg"]
    with pytest.raises(common.UserError, match="does not exist"):
        cifar10_jpeg.make(str(tmp_path / "other"), tarball=str(tmp_path / "missing.tar.gz"))
