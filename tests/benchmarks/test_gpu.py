"""The GPU-ready step on CPU: benchmarks/gpu.py end to end, the fused-AdamW switch, and a
torch.compile'd train_step against the eager one."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maskclip import MaskCLIPTask, clip_baseline, get_config
from service.spec import OptimSection
from service.train_loop import build_optimizer, build_scheduler, train_step

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_runs_on_cpu():
    cmd = [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--size", "maskclip_nano"]
    cmd += ["--batch", "4", "--steps", "2", "--warmup", "1", "--compile", "off"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rates = dict(re.findall(r"^samples/s (\S+ eager): ([\d.]+)$", result.stdout, re.M))
    mfus = dict(re.findall(r"^mfu (\S+ eager): ([\d.e+-]+)$", result.stdout, re.M))
    assert set(rates) == set(mfus) == {"clip eager", "maskclip-efficient eager"}, result.stdout
    assert all(float(v) > 0 for v in rates.values())
    assert all(0 < float(v) < 1 for v in mfus.values()), mfus


def test_benchmark_without_cuda_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    cmd = [sys.executable, "benchmarks/gpu.py", "--device", "cuda"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == "--device cuda: no CUDA device here (use --device cpu)"


def _task(seed: int = 0, clip: bool = False):
    torch.manual_seed(seed)
    cfg = get_config("maskclip_nano")
    cfg = clip_baseline(cfg) if clip else cfg
    return MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)


def test_adamw_is_fused_only_when_every_parameter_is_on_cuda():
    spec = SimpleNamespace(optim=OptimSection())
    task = _task()
    assert not build_optimizer(task, spec).defaults["fused"]
    if torch.cuda.is_available():
        assert build_optimizer(task.cuda(), spec).defaults["fused"] is True


@pytest.mark.slow  # compiling with inductor (gcc): minutes on a busy 2-core machine
def test_compiled_train_step_matches_eager():
    """optim.compile's path (torch.compile of the student's forward, as train_loop does it):
    one nano CLIP train_step gives the eager loss and the eager updated weights."""
    spec = SimpleNamespace(optim=OptimSection(warmup_steps=1, max_steps=4))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = torch.randint(5, 1000, (4, 16), generator=g)
    tokens[:, 10:] = 0
    results = []
    for compiled in (False, True):
        task = _task(clip=True)
        opt = build_optimizer(task, spec)
        sched = build_scheduler(opt, spec, 4)
        if compiled:
            task.model = torch.compile(task.model)
        t = time.perf_counter()
        out = train_step(
            task, opt, sched, images, tokens, torch.Generator().manual_seed(1),
            step=0, total_steps=4, grad_clip=1.0,
        )  # fmt: skip
        assert out.applied
        results.append((out.report["loss"], task.student.state_dict(), time.perf_counter() - t))
    (eager_loss, eager_w, _), (comp_loss, comp_w, seconds) = results
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name in eager_w:
        torch.testing.assert_close(comp_w[name], eager_w[name], rtol=1e-4, atol=1e-5, msg=name)
    print(f"compiled first step: {seconds:.1f} s")
