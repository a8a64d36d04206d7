"""EMA "mean teacher": a frozen copy of the student towers, updated by momentum."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """Momentum rising from `start` at step 0 to `end` at `total_steps` along a half cosine."""
    if total_steps <= 0:
        return end
    t = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * t) + 1) / 2


class EMATeacher(nn.Module):
    """Deep copies of the given student modules that never receive gradients.

    The copies stay in eval mode whatever `.train()` is called with, and `update` blends the
    student's parameters in: `teacher = m * teacher + (1 - m) * student`. Buffers are copied.
    """

    def __init__(self, students: dict[str, nn.Module]):
        super().__init__()
        self.towers = nn.ModuleDict({k: copy.deepcopy(v) for k, v in students.items()})
        self.towers.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    def __getitem__(self, name: str) -> nn.Module:
        return self.towers[name]

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], momentum: float) -> None:
        for name, student in students.items():
            teacher = self.towers[name]
            t_params = list(teacher.parameters())
            s_params = [p.detach() for p in student.parameters()]
            if momentum < 1.0:
                torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
            for tb, sb in zip(teacher.buffers(), student.buffers()):
                tb.copy_(sb)
