"""Resuming with changed options: every option a script has that changes a parameter's shape, the optimizer's groups,
the data order, the recipe or the precision ends in one sentence naming each difference and writes nothing; the
options that only decide where and how fast a run goes may change (common.FREE_ON_RESUME). The check is derived from
the checkpoint (its options, its model's tensors, its optimizer's groups, its grad scaler), not listed per script.

One short run per script (subprocess), then each changed command in this process (no interpreter start per case)."""
import argparse
import importlib
import signal
import sys
from unittest import mock

import pytest
import torch
import torch.nn as nn

import common

TINY = ("--subset", "32", "--epochs", "1", "--batch-size", "16", "--eval-every", "0", "--workers", "0")
RUNS = {  # the first run of each script (small heads, few crops: fast)
    "opera": ("--dim", "32", "--mlp-dim", "64"),
    "trex": ("--hidden-dim", "64", "--bottleneck-dim", "32", "--memory-size", "64", "--n-local", "2"),
    "univip": ("--hidden-dim", "64", "--proj-dim", "32"),
    "rotssl": ("--n-local", "2"),
}
# (script, the changed options, phrases the sentence must hold): the cases, then one per option that changes
# a parameter's shape or the optimizer's groups, then others that change what a step computes
CHANGES = [
    ("univip", ("--optimizer", "lars"), ["--optimizer sgd there, lars here",
                                         "optimizer parameter groups of [48] tensors there, [17, 31] here"]),
    ("univip", ("--proj-dim", "16"), ["--proj-dim 32 there, 16 here", "of the model's tensors differ"]),
    ("univip", ("--hidden-dim", "48"), ["--hidden-dim 64 there, 48 here", "of the model's tensors differ"]),
    ("univip", ("--num-instances", "3"), ["--num-instances 4 there, 3 here", "aggregator.weight: (32, 128) there, "
                                                                              "(32, 96) here"]),
    ("univip", ("--losses", "ss"), ["--losses ss,si,ii there, ss here", "2 of the model's tensors differ",
                                    "optimizer parameter groups of [48] tensors there, [46] here"]),
    ("univip", ("--arch", "resnet18"), ["--arch resnet_tiny there, resnet18 here", "of the model's tensors differ"]),
    ("rotssl", ("--global-size", "24"), ["--global-size 32 there, 24 here"]),
    ("rotssl", ("--local-size", "8"), ["--local-size 16 there, 8 here"]),
    ("rotssl", ("--epoch-queue-starts", "3"), ["--epoch-queue-starts 15 there, 3 here"]),
    ("rotssl", ("--n-prototypes", "8"), ["--n-prototypes 16 there, 8 here", "prototypes.weight: (16, 128) there"]),
    ("rotssl", ("--rot-weight", "0"), ["--rot-weight 0.1 there, 0.0 here", "of the model's tensors differ",
                                       "optimizer parameter groups of"]),
    ("rotssl", ("--queue-length", "32", "--n-prototypes", "16"), ["--queue-length 0 there, 32 here",
                                                             "queue: none there, (2, 32, 128) here"]),
    ("rotssl", ("--base", "byol"), ["--base swav there, byol here", "of the model's tensors differ"]),
    ("opera", ("--dim", "16"), ["--dim 32 there, 16 here", "of the model's tensors differ"]),
    ("opera", ("--mlp-dim", "48"), ["--mlp-dim 64 there, 48 here", "of the model's tensors differ"]),
    ("opera", ("--sup-weight", "0"), ["--sup-weight 0.5 there, 0.0 here", "of the model's tensors differ"]),
    ("opera", ("--optimizer", "adamw"), ["--optimizer lars there, adamw here", "optimizer parameter groups of"]),
    ("opera", ("--precision", "bf16"), ["--precision auto there, bf16 here"]),
    ("opera", ("--labeled-fraction", "0.5"), ["--labeled-fraction 1.0 there, 0.5 here"]),
    ("trex", ("--projector-layers", "2"), ["--projector-layers 3 there, 2 here", "of the model's tensors differ"]),
    ("trex", ("--hidden-dim", "48"), ["--hidden-dim 64 there, 48 here", "of the model's tensors differ"]),
    ("trex", ("--bottleneck-dim", "16"), ["--bottleneck-dim 32 there, 16 here", "of the model's tensors differ"]),
    ("trex", ("--memory-size", "0"), ["--memory-size 64 there, 0 here", "of the model's tensors differ"]),
    ("trex", ("--n-local", "3"), ["--n-local 2 there, 3 here"]),
    ("trex", ("--seed", "1"), ["--seed 0 there, 1 here"]),
    ("trex", ("--batch-size", "32", "--lr", "0.4"), ["--batch-size 16 there, 32 here"]),
]


def _main(script, *argv):
    """`python SCRIPT.py argv` in this process (no interpreter start): returns the exit status."""
    saved, sys.argv = sys.argv, [f"{script}.py", *map(str, argv)]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # a run that trains sets them
    try:
        common.run_main(importlib.import_module(script).main)
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """Each script's first run, in its own --out (run on demand, once per module)."""
    root, done = tmp_path_factory.mktemp("resume"), {}
    def out(script):
        if script not in done:
            assert _main(script, *TINY, *RUNS[script], "--out", root / script) == 0
            done[script] = root / script
        return done[script]
    return out


@pytest.fixture
def in_process(capsys):
    """Returns run(script, *argv) -> (exit status, what it printed to stderr)."""
    def run(script, *argv):
        capsys.readouterr()  # not what came before (a first run)
        return _main(script, *argv), capsys.readouterr().err
    return run


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("script,changed,phrases", CHANGES, ids=[f"{c[0]}{' '.join(c[1])}" for c in CHANGES])
def test_resuming_with_a_changed_option_is_one_sentence_and_writes_nothing(first_runs, in_process, script, changed,
                                                                          phrases):
    out = first_runs(script)
    before = _snapshot(out)
    status, err = in_process(script, *TINY, *RUNS[script], *changed, "--out", out)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: {out}/checkpoint.pt was trained with other options: ")
    assert lines[0].endswith("; resume with the same options or use another --out")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert _snapshot(out) == before  # nothing written, nothing tidied


@pytest.mark.parametrize("script", RUNS)
def test_the_same_options_resume_and_where_and_how_fast_may_change(first_runs, in_process, script, tmp_path):
    """The first run's command again (with other --log-every, --save-every, --data-dir, --eval-subset, and a lower
    --lr as after a non-finite loss): the check passes, and the finished run says so."""
    out = first_runs(script)
    free = ("--log-every", "7", "--save-every", "5", "--data-dir", tmp_path, "--eval-subset", "10", "--lr", "0.05")
    status, err = in_process(script, *TINY, *RUNS[script], *free, "--out", out)
    assert status == 0 and "error" not in err, err[-3000:]


def test_the_check_is_derived_from_the_checkpoint_model_optimizer_and_scaler():
    """Options equal, the structure not (code changed between the runs, or an option a script forgot to record):
    the model's tensors, the optimizer's groups and the grad scaler are compared with the checkpoint's."""
    args = argparse.Namespace(arch="resnet_tiny", lr=0.1, script="m", workers=4)
    saved, model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    ckpt = {"args": common.plain_args(args), "model": saved.state_dict(),
            "optimizer": torch.optim.SGD(saved.parameters(), lr=0.1).state_dict(), "scaler": {}}
    assert common.resume_mismatches(ckpt, args, saved, torch.optim.SGD(saved.parameters(), lr=0.1)) == []
    fp16 = mock.Mock(is_enabled=lambda: True)  # what --precision fp16 (or auto on an older GPU) builds: an enabled
    # grad scaler (a stand-in: torch 2.1 has no CPU GradScaler to build one here)
    found = common.resume_mismatches(ckpt, argparse.Namespace(**{**vars(args), "workers": 0}), model,
                                     common.LARS(common.param_groups(model, 0.0)), fp16)
    assert found == ["6 of the model's tensors differ (0.bias: (3,) there, (4,) here)",
                     "optimizer parameter groups of [4] tensors there, [1, 3] here",
                     "bf16 or fp32 (no grad scaler) there, fp16 (a grad scaler) here"]  # --workers may change
