"""tests/bench_gpu.py in --quick mode: the GPU benchmark's code path on the CPU, kept from rotting."""
import re

import pytest
import torch

import common
from bench_gpu import METHODS, get_args
from conftest import run_script


def test_quick_mode_prints_a_row_of_numbers_for_every_method_and_the_torchrun_run():
    result = run_script("tests/bench_gpu.py", "--quick", "--images", "16", "--batch-size", "8", "--epochs", "1",
                        "--pytest-timeout", "0", timeout=600)
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in result.stdout.splitlines()
                                              if line.startswith("| ") and not line.startswith("| run |"))}
    assert len(rows) == len(METHODS) + 1, result.stdout
    torchrun = next(row for name, row in rows.items() if "torchrun --nproc_per_node=1" in name)
    for cells in [rows[label] for label, _ in METHODS.values()] + [torchrun]:
        crops, images_per_s, data_wait, memory, step, ratio, colour = cells
        assert re.fullmatch(r"\d+ x 32( \+ .*)?", crops) and float(images_per_s.replace(",", "")) > 0, cells
        assert re.fullmatch(r"\d+%", data_wait) and memory == "n/a" and re.fullmatch(r"\d+ ms", step), cells
        assert float(ratio.rstrip("x")) > 0 and (colour == "-" if cells is torchrun else
                                                 re.fullmatch(r"\d+\.\d ms", colour)), cells
    assert "resnet_tiny, fp32, batch 8" in result.stdout and "tests/test_cuda.py: not run" in result.stdout


@pytest.mark.parametrize("flags, message", [
    pytest.param([], r"measures a CUDA GPU and none is visible here; run `python tests/bench_gpu.py --quick`",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"), id="GPU mode on a CPU"),
    pytest.param(["--quick", "--images", "4", "--batch-size", "8"], r"--images at least --batch-size", id="too few"),
])
def test_bad_use_is_refused_in_one_sentence_before_anything_is_written(flags, message):
    with pytest.raises(common.UserError, match=message):  # run_main prints it as one line and exits with status 2
        get_args(flags)
