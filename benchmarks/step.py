"""Step-time and FLOP-efficiency benchmark for the MaskCLIP library (no Ray, no MLflow).

    python benchmarks/step.py                      # CPU test size + ViT-B/16 at small batch
    python benchmarks/step.py --sizes maskclip_tiny --batch 64 --repeats 5

For each model size it times, on the same batch, one full training step (forward, backward,
AdamW, EMA update) of CLIP (distillation off) and of MaskCLIP in each mode, interleaving the
arms so machine noise hits them alike, and reports median ratios. It then counts the training
FLOPs of the best MaskCLIP mode (torch.utils.flop_counter) and divides the achieved FLOP/s by
this machine's large-GEMM FLOP/s measured in the same run. The last two lines are for scripts:
`maskclip/clip step ratio: X.XX` (best mode, CPU test size) and `flops/gemm ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskclip import MaskCLIPTask, clip_baseline, get_config

MODES = ("efficient", "faithful")


def gemm_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm the kernels and the thread pool
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_arm(cfg, seed: int = 0):
    torch.manual_seed(seed)
    task = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return task, opt


def step(task, opt, images, tokens, gen):
    loss, _ = task.training_forward(images, tokens, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    task.update_teacher(1, 100)


def batch_for(cfg, batch: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ctx = cfg.text.context_length
    tokens = torch.randint(4, cfg.text.vocab_size, (batch, ctx), generator=g)
    lengths = torch.randint(ctx // 4, ctx, (batch,), generator=g)
    tokens[torch.arange(ctx)[None] >= lengths[:, None]] = 0
    return images, tokens


def bench_size(name: str, batch: int, repeats: int) -> tuple[dict[str, float], float]:
    base = get_config(name)
    arms = {"clip": clip_baseline(base)}
    for mode in MODES:
        arms[f"maskclip-{mode}"] = dataclasses.replace(
            base, distill=dataclasses.replace(base.distill, mode=mode)
        )
    images, tokens = batch_for(base, batch)
    built = {k: make_arm(c) for k, c in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(repeats + 1):  # first round warms up
        for k, (task, opt) in built.items():
            gen = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            step(task, opt, images, tokens, gen)
            if r:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {}
    for k, (task, opt) in built.items():
        with FlopCounterMode(display=False) as fc:
            step(task, opt, images, tokens, torch.Generator().manual_seed(0))
        flops[k] = fc.get_total_flops()
    print(f"\n{name}  batch {batch}  ({repeats} interleaved repeats, median step time)")
    for k, v in med.items():
        print(
            f"  {k:<22} {v * 1000:8.1f} ms   ratio to clip {v / med['clip']:.2f}"
            f"   (counted FLOPs ratio {flops[k] / flops['clip']:.2f})"
        )
    best = min((k for k in med if k != "clip"), key=med.get)
    achieved = flops[best] / med[best]
    return {k: v / med["clip"] for k, v in med.items()}, achieved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["maskclip_tiny", "maskclip_vit_b16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 8], help="one per size")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timed rounds per size (default 15 for <= 64 px sizes, 3 above)",
    )
    args = ap.parse_args()
    batches = args.batch + [args.batch[-1]] * (len(args.sizes) - len(args.batch))
    torch.set_num_threads(torch.get_num_threads())
    gemm = gemm_flops()
    print(
        f"large GEMM (2048^3 fp32): {gemm / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads"
    )
    results = {}
    for name, batch in zip(args.sizes, batches):
        repeats = args.repeats or (15 if get_config(name).vision.image_size <= 64 else 3)
        ratios, achieved = bench_size(name, batch, repeats)
        best = min((k for k in ratios if k != "clip"), key=ratios.get)
        results[name] = (ratios[best], achieved / gemm, best)
        print(
            f"  best mode {best}: {ratios[best]:.2f}x clip; achieved {achieved / 1e9:.1f} GFLOP/s"
            f" = {achieved / gemm:.2f} of GEMM"
        )
    first = results[args.sizes[0]]
    print(f"\nmaskclip/clip step ratio: {first[0]:.2f}")
    print(f"flops/gemm ratio: {first[1]:.2f}")


if __name__ == "__main__":
    main()
