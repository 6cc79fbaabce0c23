"""The GPU path, where CUDA is present (skipped on the CPU machines the rest of the suite runs on):
    python -m pytest -q -s tests/test_cuda.py     # -s prints images/s, data_wait and peak memory per run

What one GPU shows: every method trains eagerly and under torch.compile in bf16 (CUDA autocast, channels_last, pinned
views copied before their concatenation); the kNN monitor's feature extraction and the Gaussian blur run on the GPU
(96 px images: not small, so blurred); the colour augmentation on the GPU equals the CPU's within a stated tolerance;
fp16 trains with its grad scaler, whose state checkpoint.pt holds; a ViT trains; a run killed after its first
checkpoint resumes on the GPU (its own GPU's random stream restored) and lands near an uninterrupted run.
What one GPU cannot show: NCCL, DDP and SyncBatchNorm (test_two_processes_over_nccl runs where 2 GPUs are visible,
and is skipped otherwise); bit-equal resumes (cuDNN's autotuner and the atomics of index_add_ / scatter_add_ make GPU
runs non-deterministic: the data order, the augmentations' parameters and the random streams stay exact, the sums
do not); --compile on several GPUs (refused until a run has shown it works: test_two_processes_over_nccl checks the
refusal)."""
import math

import pytest
import torch
from torchvision.transforms import v2

import common
from conftest import colour_aug, read_log, run_killed_after_first_checkpoint, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FEW_STEPS = ("--subset", "512", "--batch-size", "64", "--epochs", "2", "--eval-every", "0", "--workers", "4")
METHODS = {
    "opera": ("opera.py",),
    "trex": ("trex.py", "--n-local", "4"),
    "swav_rot": ("rotssl.py", "--n-local", "4"),
    "byol_rot": ("rotssl.py", "--base", "byol"),
    "univip": ("univip.py", "--subset", "256"),
}


def _report(name, out):
    last = read_log(out)[-1]
    print(f"\n{name}: {last['images_per_s']:.0f} images/s, data_wait {last['data_wait']:.0%}, "
          f"peak memory {last['peak_mem_mb']:.0f} MB on {torch.cuda.get_device_name()}")
    return last


def _finished(out, epochs=2):
    """log.jsonl of a finished run: one line per epoch, a finite loss, GPU memory measured."""
    log = read_log(out)
    assert [r["epoch"] for r in log[1:] if "loss" in r] == list(range(1, epochs + 1))
    assert math.isfinite(log[-1]["loss"]) and log[-1]["peak_mem_mb"] > 0
    assert log[0]["gpus"] >= 1 and log[0]["cuda"]
    return log


@pytest.fixture(scope="module")
def images_96px(tmp_path_factory):
    """An ImageFolder (train/, val/) of 96 px synthetic shapes: above 64 px, so the ImageNet stem and the blur."""
    root = tmp_path_factory.mktemp("shapes96")
    for split, n in (("train", 512), ("val", 100)):
        data = common.Synthetic(split, size=n, img_size=96)
        for i in range(n):
            image, label = data[i]
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            image.save(root / split / str(label) / f"{i}.png")
    return root


def test_convnets_and_every_view_are_channels_last_on_the_gpu():
    import rotssl
    cuda = torch.device("cuda")
    model = common.to_device(common.build_backbone("resnet_tiny", small_images=True)[0], cuda)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
    colour = colour_aug(blur_p=0.5)
    views = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).pin_memory(),
              torch.stack([colour.sample() for _ in range(4)]).pin_memory()) for _ in range(2)]
    out = colour.on_device(views, cuda)
    assert all(v.is_cuda and v.is_contiguous(memory_format=torch.channels_last) for v in out)
    rotated = rotssl.rotate_views(out[0], torch.tensor([0, 1, 2, 3], device=cuda))
    assert rotated.is_contiguous(memory_format=torch.channels_last)  # cuDNN gets them as it gets the views
    assert colour.mean.is_cuda  # the normalisation constants stay on the GPU


def test_colour_augmentation_on_the_gpu_equals_the_cpu_within_two_levels():
    """The same uint8 crops and parameters on both devices, every op drawn often (jitter, grayscale, blur, solarize).
    Tolerance: 2/255 in pixel units (about 2 grey levels) anywhere, 1e-3 on average. Why not exact: the GPU's
    float32 rounds differently, cuDNN's blur convolution is TF32 (10-bit mantissa, about 5e-4), and solarize
    flips pixels within that of its threshold (a change of at most twice their distance to it)."""
    torch.manual_seed(0)
    colour = colour_aug(jitter_p=0.9, gray_p=0.2, blur_p=0.8, solarize_p=0.3, blur_scale=96 / 224)
    shapes = common.Synthetic("train", img_size=96)
    images = torch.stack([v2.functional.pil_to_tensor(shapes[i][0]) for i in range(64)])
    params = torch.stack([colour.sample() for _ in range(64)])
    assert (params[:, 9] > 0).sum() > 30 and (params[:, 10] > 0).sum() > 5  # blur and solarize both exercised
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    cpu = colour(images, params) * std
    gpu = colour(images.cuda(), params.cuda()).cpu() * std
    difference = (gpu - cpu).abs()
    assert difference.max() <= 2 / 255 and difference.mean() <= 1e-3, (difference.max(), difference.mean())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_in_bf16(tmp_path, name, compiled):
    if compiled and (why := common.compile_unsupported()):
        pytest.skip(f"torch.compile cannot run here: {why}")
    script, *flags = METHODS[name]
    run_script(script, *FEW_STEPS, *flags, "--precision", "bf16", *(["--compile"] if compiled else []),
               "--out", tmp_path, timeout=900)
    log = _finished(tmp_path)
    assert log[0]["args"]["precision"] == "bf16" and log[0]["args"]["compile"] is compiled
    _report(f"{name} ({'compiled' if compiled else 'eager'})", tmp_path)


def test_knn_monitor_and_blur_on_the_gpu_with_images_above_64px(tmp_path, images_96px):
    """--eval-every 1 on 96 px images: the monitor at random init and after each epoch (feature extraction on the
    GPU, channels_last) and OPERA's class head; the blur on the views (ImageNet stem: not small)."""
    run_script("opera.py", "--data", images_96px, "--crop-size", "96", "--batch-size", "64", "--epochs", "2",
               "--eval-every", "1", "--workers", "4", "--out", tmp_path, timeout=900)
    log = _finished(tmp_path)
    knn = [r["knn_top1"] for r in log[1:]]
    assert len(knn) == 3 and all(0 <= k <= 100 for k in knn)  # random init, epochs 1 and 2
    assert all(0 <= r["head_top1"] <= 100 for r in log[2:])
    record = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert record["small_images"] is False and record["img_size"] == 96  # blurred views (blur off only when small)
    _report("opera, 96 px, kNN every epoch", tmp_path)


def test_fp16_trains_with_its_grad_scaler(tmp_path):
    run_script("rotssl.py", "--base", "byol", *FEW_STEPS, "--precision", "fp16", "--out", tmp_path, timeout=900)
    log = _finished(tmp_path)
    assert log[0]["args"]["precision"] == "fp16"
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert scaler and math.isfinite(scaler["scale"]) and scaler["scale"] > 0  # an active scaler's state
    _report("byol_rot (fp16)", tmp_path)


def test_a_vit_trains(tmp_path):
    run_script("opera.py", "--arch", "vit_small", *FEW_STEPS, "--out", tmp_path, timeout=900)
    log = _finished(tmp_path)
    assert log[0]["args"]["arch"] == "vit_small"
    assert torch.load(tmp_path / "backbone.pt", weights_only=True)["arch"] == "vit_small"
    _report("opera (vit_small)", tmp_path)


def test_kill_and_resume_on_the_gpu(tmp_path):
    """Killed after epoch 1's checkpoint, resumed: the checkpoint holds this process's own GPU stream, the resumed run
    finishes epoch 2 only, and its weights land within 5 % (relative norm) of an uninterrupted run's: not bit-equal
    on a GPU (see the module's docstring), but a resume that lost the optimizer state or the model would be far."""
    args = ("trex.py", *FEW_STEPS, "--n-local", "2")
    run_script(*args, "--out", tmp_path / "straight", timeout=900)
    first = run_killed_after_first_checkpoint(*args, out=tmp_path / "resumed", timeout=900)
    assert first["epoch"] == 1 and first["rng"][0]["cuda"].dtype == torch.uint8  # one GPU's state, not a list
    run_script(*args, "--out", tmp_path / "resumed", timeout=900)
    assert [r["epoch"] for r in read_log(tmp_path / "resumed")[1:]] == [1, 2]
    a, b = (torch.load(tmp_path / d / "backbone.pt", weights_only=True)["state_dict"] for d in ("straight", "resumed"))
    weights = [k for k, v in a.items() if v.is_floating_point() and "running" not in k]
    distance = math.sqrt(sum((a[k] - b[k]).float().pow(2).sum() for k in weights))
    norm = math.sqrt(sum(a[k].float().pow(2).sum() for k in weights))
    assert distance < 0.05 * norm, distance / norm


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL, DDP and SyncBatchNorm")
@pytest.mark.parametrize("name", ["trex", "swav_rot"])
def test_two_processes_over_nccl(tmp_path, name):
    """torchrun with 2 processes: NCCL, DDP, SyncBatchNorm; t-ReX checks at every epoch's end that both replicas
    (parameters and memory) are identical, SwAV's codes all-reduce their sums and its queue all-gathers. --compile
    there is refused in one sentence (not run yet with SyncBatchNorm)."""
    script, *flags = METHODS[name]
    queue = ("--queue-length", "128", "--epoch-queue-starts", "1") if name == "swav_rot" else ()
    run_script(script, *FEW_STEPS, *flags, *queue, "--out", tmp_path / "run", nproc=2, timeout=900)
    _finished(tmp_path / "run")
    _report(f"{name} (2 GPUs, NCCL)", tmp_path / "run")
    refused = run_script(script, *FEW_STEPS, *flags, "--compile", "--out", tmp_path / "compiled", nproc=2,
                         check=False)
    assert refused.returncode != 0 and "--compile with several GPU processes has not been run yet" in refused.stderr
    assert not (tmp_path / "compiled").exists()
