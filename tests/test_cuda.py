"""The GPU paths: bf16 autocast, channels_last, torch.compile and NCCL under torchrun, one method at a time.

Runs only where CUDA is present (skipped on the CPU machines the rest of the suite runs on):
    python -m pytest -q -s tests/test_cuda.py     # -s prints images/s, data_wait and peak memory per method
Each run is a few steps on the synthetic images (one process, so SyncBatchNorm is a no-op).
"""
import math

import pytest
import torch

import common
from conftest import read_log, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FEW_STEPS = ("--subset", "1024", "--batch-size", "128", "--epochs", "2", "--eval-every", "0", "--workers", "4",
             "--precision", "bf16", "--compile")
METHODS = {
    "opera": ("opera.py",),
    "trex": ("trex.py",),
    "swav_rot": ("rotssl.py",),
    "byol_rot": ("rotssl.py", "--base", "byol"),
    "univip": ("univip.py", "--subset", "512"),
}


def test_convnets_are_channels_last_on_the_gpu():
    model = common.to_device(common.build_backbone("resnet_tiny", small_images=True)[0], torch.device("cuda"))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_compiled_run_under_torchrun(tmp_path, name):
    if why := common.compile_unsupported():
        pytest.skip(f"torch.compile cannot run here: {why}")
    script, *flags = METHODS[name]
    run_script(script, *FEW_STEPS, *flags, "--out", tmp_path / name, torchrun=True, timeout=900)
    log = read_log(tmp_path / name)
    assert log[0]["args"]["precision"] == "bf16" and log[0]["args"]["compile"] is True
    last = log[-1]
    assert last["epoch"] == 2 and math.isfinite(last["loss"]) and last["peak_mem_mb"] > 0
    print(f"\n{name}: {last['images_per_s']:.0f} images/s, data_wait {last['data_wait']:.0%}, "
          f"peak memory {last['peak_mem_mb']:.0f} MB on {torch.cuda.get_device_name()}")
