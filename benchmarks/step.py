"""Step-time and FLOP-efficiency benchmark for the MaskCLIP library (no Ray, no MLflow).

    python benchmarks/step.py                      # CPU test size + ViT-B/16 at small batch
    python benchmarks/step.py --sizes maskclip_tiny --batch 64 --rounds 8

For each model size it times, on the same batch, full training steps (forward, backward, AdamW,
EMA update) of CLIP (distillation off) and of MaskCLIP in each mode. Each round runs every arm
for a block of consecutive steps (default 2), in shuffled order, so machine noise and drift hit
the arms alike; short blocks and many rounds keep the arms close in time, which matters on a
shared machine whose slow spells last seconds. The estimate is the median of the warm steps
(all but the first of each block): a training loop runs step after step of one model, while the
first step after switching arms starts with the other arms' weights in the caches (~25% slower
for CLIP here, more for the arms with an EMA teacher). That first-step ratio is printed beside
the estimate, with an 80% bootstrap interval over rounds.
It then counts the training FLOPs of the best MaskCLIP mode (torch.utils.flop_counter) and
divides the achieved FLOP/s (from the median step) by this machine's large-GEMM FLOP/s, sampled
before every round and summarised by the same statistic (median; the best sample is printed
too: one lucky GEMM against a typical step moved the ratio by ±0.05 here). The
last two lines are for scripts: `maskclip/clip step ratio: X.XX` (best mode, CPU test size) and
`flops/gemm ratio: X.XX`.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskclip import MaskCLIPTask, clip_baseline, get_config

MODES = ("efficient", "faithful")


def gemm_samples(n: int = 2048, repeats: int = 5, warm: int = 1) -> list[float]:
    """FLOP/s of `repeats` timed n^3 fp32 matmuls, after `warm` untimed ones."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(warm):  # warm the kernels and the thread pool
        a @ b
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        out.append(2 * n**3 / (time.perf_counter() - t))
    return out


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


def bench_size(
    name: str, batch: int, rounds: int, block: int, seed: int = 0
) -> tuple[dict[str, float], float, float]:
    base = get_config(name)
    arms = {"clip": clip_baseline(base)}
    for mode in MODES:
        arms[f"maskclip-{mode}"] = dataclasses.replace(
            base, distill=dataclasses.replace(base.distill, mode=mode)
        )
    images, tokens = batch_for(base, batch)
    built = {k: make_arm(c) for k, c in arms.items()}
    warm: dict[str, list[list[float]]] = {k: [] for k in arms}  # per round, warm steps
    after_switch: dict[str, list[float]] = {k: [] for k in arms}
    order_rng = random.Random(seed)
    gemm: list[float] = []
    for r in range(rounds + 1):  # round 0 warms kernels and allocator, untimed
        gemm += gemm_samples(repeats=3)  # the machine's GEMM rate, sampled across the run
        order = list(built)
        order_rng.shuffle(order)  # no arm always follows the same neighbour
        for k in order:
            task, opt = built[k]
            times = []
            for i in range(block):
                gen = torch.Generator().manual_seed(r * block + i)
                t = time.perf_counter()
                step(task, opt, images, tokens, gen)
                times.append(time.perf_counter() - t)
            if r:
                after_switch[k].append(times[0])
                warm[k].append(times[1:])
    med = {k: statistics.median(sum(v, [])) for k, v in warm.items()}
    cold = {k: statistics.median(v) for k, v in after_switch.items()}
    flops = {}
    for k, (task, opt) in built.items():
        with FlopCounterMode(display=False) as fc:
            step(task, opt, images, tokens, torch.Generator().manual_seed(0))
        flops[k] = fc.get_total_flops()
    print(
        f"\n{name}  batch {batch}  ({rounds} rounds x {block} consecutive steps per arm; "
        f"median of the {block - 1} warm steps per block)"
    )
    for k, v in med.items():
        print(
            f"  {k:<22} {v * 1000:8.1f} ms   ratio to clip {v / med['clip']:.2f}"
            f"   (counted FLOPs {flops[k] / flops['clip']:.2f};"
            f" first step after switching arms {cold[k] / cold['clip']:.2f})"
        )
    best = min((k for k in med if k != "clip"), key=med.get)
    lo, hi = bootstrap_ratio(warm[best], warm["clip"], random.Random(seed))
    print(f"  {best} / clip, 80% interval over resampled rounds: {lo:.2f}-{hi:.2f}")
    achieved = flops[best] / med[best]
    g = statistics.median(gemm)
    print(
        f"  large GEMM (2048^3 fp32, {torch.get_num_threads()} threads) during the run: median"
        f" {g / 1e9:.1f} GFLOP/s over {len(gemm)} samples (best {max(gemm) / 1e9:.1f})"
    )
    return {k: v / med["clip"] for k, v in med.items()}, achieved, g


def bootstrap_ratio(arm, clip, rng, draws=2000):
    """10th/90th percentile of the median-time ratio when whole rounds are resampled."""
    n = len(arm)
    ratios = []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        a = statistics.median(t for i in pick for t in arm[i])
        c = statistics.median(t for i in pick for t in clip[i])
        ratios.append(a / c)
    ratios.sort()
    return ratios[draws // 10], ratios[draws * 9 // 10]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["maskclip_tiny", "maskclip_vit_b16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 8], help="one per size")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per size; each runs every arm once, in shuffled order "
        "(default 20 for <= 64 px sizes, 4 above)",
    )
    ap.add_argument(
        "--block",
        type=int,
        default=None,
        help="consecutive steps per arm per round; the first is not in the estimate (default 2)",
    )
    args = ap.parse_args()
    batches = args.batch + [args.batch[-1]] * (len(args.sizes) - len(args.batch))
    torch.set_num_threads(torch.get_num_threads())
    results = {}
    for name, batch in zip(args.sizes, batches):
        small = get_config(name).vision.image_size <= 64
        rounds = args.rounds or (20 if small else 4)
        block = max(2, args.block or 2)
        ratios, achieved, gemm = bench_size(name, batch, rounds, block)
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
