"""Training-step throughput and MFU on one device (no Ray, no MLflow):

    python benchmarks/gpu.py                                   # one GPU: ViT-B/16, 224 px
    python benchmarks/gpu.py --device cpu --size maskclip_nano --batch 4 --steps 2 --compile off

For CLIP (distillation off) and efficient MaskCLIP, eager and `torch.compile`d, it times
`--steps` full training steps through `service.train_loop.train_step` (bf16 autocast on CUDA,
the optimiser `build_optimizer` makes: fused AdamW when every parameter is on CUDA, EMA update)
after `--warmup` untimed ones (compilation happens there), and prints samples/s and MFU:
achieved FLOP/s ÷ this device's measured large-GEMM rate (bf16 n^3 matmuls on CUDA, fp32 on
CPU; best of the samples). Training FLOPs per step are counted as benchmarks/step.py counts
them (torch.utils.flop_counter over one eager step). Budget on one GPU: well under 5 minutes,
most of it compiling. The last lines are for scripts: `samples/s <arm> <eager|compiled>: X` and
`mfu <arm> <eager|compiled>: X`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskclip import MaskCLIPTask, clip_baseline, get_config
from service.spec import OptimSection
from service.train_loop import build_optimizer, build_scheduler, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of `repeats` timed n^3 matmuls (after two untimed ones)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def make_batch(cfg, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    ctx = cfg.text.context_length
    tokens = torch.randint(4, cfg.text.vocab_size, (batch, ctx), generator=g)
    lengths = torch.randint(ctx // 4, ctx, (batch,), generator=g)
    tokens[torch.arange(ctx)[None] >= lengths[:, None]] = 0
    return images.to(device), tokens.to(device)


def build(cfg, device: torch.device, compiled: bool, checkpointing: bool, total_steps: int):
    torch.manual_seed(0)
    task = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3).to(device).train()
    task.student.set_grad_checkpointing(checkpointing)
    spec = SimpleNamespace(optim=OptimSection(warmup_steps=1, max_steps=total_steps))
    optimizer = build_optimizer(task, spec)
    scheduler = build_scheduler(optimizer, spec, total_steps)
    if compiled:  # as service.train_loop does: the student's forward
        task.model = torch.compile(task.model)
    return task, optimizer, scheduler


def run_arm(cfg, args, device, autocast: bool, compiled: bool) -> tuple[float, float, float]:
    """(samples/s, seconds per step, counted training FLOPs per step)."""
    total = args.warmup + args.steps + 1
    task, opt, sched = build(cfg, device, compiled, args.grad_checkpointing, total)
    images, tokens = make_batch(cfg, args.batch, device)
    done = 0

    def one(gen):
        nonlocal done
        out = train_step(
            task, opt, sched, images, tokens, gen, step=done, total_steps=total,
            grad_clip=1.0, autocast=autocast,
        )  # fmt: skip
        assert out.applied, "non-finite loss in the benchmark"
        done += 1

    for i in range(args.warmup):
        one(torch.Generator().manual_seed(i))
    sync(device)
    times = []
    for i in range(args.steps):
        gen = torch.Generator().manual_seed(100 + i)
        t = time.perf_counter()
        one(gen)
        sync(device)
        times.append(time.perf_counter() - t)
    per_step = statistics.median(times)
    eager = task.student  # count the FLOPs on the plain module: the same maths
    task.model = eager
    with FlopCounterMode(display=False) as fc:
        one(torch.Generator().manual_seed(0))
    return args.batch / per_step, per_step, float(fc.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--size", default="maskclip_vit_b16", help="registered model size")
    ap.add_argument("--batch", type=int, default=256, help="samples per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast on CUDA, fp32 on CPU (as optim.precision)")  # fmt: skip
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--gemm-size", type=int, default=0, help="0: 8192 on CUDA, 1024 on CPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    autocast = args.precision == "bf16" or (args.precision == "auto" and cuda)
    dtype = torch.bfloat16 if autocast else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 outside autocast (norms, loss)
    peak = gemm_rate(device, dtype, args.gemm_size or (8192 if cuda else 1024))
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    base = get_config(args.size)
    arms = {
        "clip": clip_baseline(base),
        "maskclip-efficient": dataclasses.replace(
            base, distill=dataclasses.replace(base.distill, mode="efficient")
        ),
    }
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(
        f"{name}: {args.size} at {base.vision.image_size} px, batch {args.batch}, "
        f"{'bf16 autocast' if autocast else 'fp32'}; large {str(dtype)[6:]} GEMM "
        f"{peak / 1e12:.2f} TFLOP/s"
    )
    results = []
    for arm, cfg in arms.items():
        for compiled in compiles:
            t0 = time.perf_counter()
            rate, per_step, flops = run_arm(cfg, args, device, autocast, compiled)
            mfu = flops / per_step / peak
            kind = "compiled" if compiled else "eager"
            results.append((arm, kind, rate, mfu))
            print(
                f"  {arm:<20} {kind:<8} {rate:9.1f} samples/s  {per_step * 1000:8.1f} ms/step  "
                f"{flops / per_step / 1e12:7.3f} TFLOP/s  MFU {mfu:.3g}  "
                f"({flops / args.batch / 1e9:.1f} GFLOP/sample; arm took "
                f"{time.perf_counter() - t0:.0f} s)"
            )
    for arm, kind, rate, _ in results:
        print(f"samples/s {arm} {kind}: {rate:.1f}")
    for arm, kind, _, mfu in results:
        print(f"mfu {arm} {kind}: {mfu:.4g}")


if __name__ == "__main__":
    main()
