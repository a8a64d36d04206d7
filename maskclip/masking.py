"""Patch masks for the image student and token masks for the text student.

Every mask has an exact count of masked elements per row and is reproducible from a
`torch.Generator`. `True` means masked.
"""

from __future__ import annotations

import math
import random

import torch


def num_masked(num_patches: int, ratio: float) -> int:
    """Exact number of masked patches for a ratio (at least 1, at most all but one)."""
    return min(num_patches - 1, max(1, round(ratio * num_patches)))


def random_mask(
    batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random patch masks: `[batch, num_patches]` bool, `num_masked` True per row."""
    k = num_masked(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < k


def block_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    generator: torch.Generator | None = None,
    min_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """BEiT-style block-wise masks of exactly `num_masked` patches per image.

    Rectangular blocks (area >= `min_block`, log-uniform aspect ratio) are added until the
    target count is reached; the last block contributes only as many new patches as needed
    (chosen at random) so every row has exactly the same count. The per-block work is plain
    Python on one seed drawn from `generator` (torch scalar ops per block cost ~10x more and
    sit on the training step's hot path).
    """
    h, w = grid
    n = h * w
    k = num_masked(n, ratio)
    if min_block is None:  # BEiT uses 16 of 196 patches; scale that to the grid
        min_block = max(2, round(16 * n / 196))
    lo_ar, hi_ar = math.log(aspect[0]), math.log(aspect[1])
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    rng = random.Random(seed)
    out = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        mask = bytearray(n)
        count = 0
        while count < k:
            area = rng.uniform(min_block, max(min_block, k - count) + 1e-6)
            ar = math.exp(rng.uniform(lo_ar, hi_ar))
            bh = max(1, min(h, round(math.sqrt(area * ar))))
            bw = max(1, min(w, round(math.sqrt(area / ar))))
            top = rng.randrange(h - bh + 1)
            left = rng.randrange(w - bw + 1)
            new = [
                r * w + c
                for r in range(top, top + bh)
                for c in range(left, left + bw)
                if not mask[r * w + c]
            ]
            if not new:
                continue
            if len(new) > k - count:
                new = rng.sample(new, k - count)
            for i in new:
                mask[i] = 1
            count += len(new)
        out[b] = torch.frombuffer(mask, dtype=torch.uint8).bool()
    return out


def patch_mask(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dispatch on the masking kind: 'block' or 'random'."""
    if kind == "block":
        return block_mask(batch, grid, ratio, generator)
    if kind == "random":
        return random_mask(batch, grid[0] * grid[1], ratio, generator)
    raise ValueError(f"unknown masking kind {kind!r} (expected 'block' or 'random')")


def text_mask(
    tokens: torch.Tensor,
    ratio: float,
    special_ids: tuple[int, ...],
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `round(ratio * n)` (at least 1) of each caption's n non-special tokens.

    Returns `(masked_tokens, mask)` where masked positions hold `mask_id`. Special tokens
    (padding, start, end) are never masked; a caption without content tokens gets no mask.
    """
    special = torch.zeros_like(tokens, dtype=torch.bool)
    for sid in special_ids:
        special |= tokens == sid
    real = ~special
    n_real = real.sum(dim=1)
    k = torch.clamp((n_real.float() * ratio).round().long(), min=1)
    k = torch.minimum(k, n_real)
    noise = torch.rand(tokens.shape, generator=generator, device="cpu").to(tokens.device)
    noise = noise.masked_fill(~real, 2.0)  # special tokens sort last
    ranks = noise.argsort(dim=1).argsort(dim=1)
    mask = ranks < k[:, None]
    return tokens.masked_fill(mask, mask_id), mask
