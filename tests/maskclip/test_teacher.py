import math

import torch
from torch import nn

from maskclip import MaskCLIPTask, get_config
from maskclip.teacher import EMATeacher, cosine_momentum


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.996, 1.0) == 0.996
    assert math.isclose(cosine_momentum(100, 100, 0.996, 1.0), 1.0)
    assert math.isclose(cosine_momentum(50, 100, 0.996, 1.0), 0.998)
    values = [cosine_momentum(s, 100, 0.9, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_ema_update_math_and_no_grad():
    student = nn.Linear(3, 2)
    teacher = EMATeacher({"lin": student})
    before = teacher["lin"].weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update({"lin": student}, momentum=0.9)
    expected = 0.9 * before + 0.1 * student.weight
    assert torch.allclose(teacher["lin"].weight, expected)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train(True)
    assert not teacher.training and not teacher["lin"].training


def test_task_teacher_gets_no_gradient_and_stays_in_eval():
    task = MaskCLIPTask(get_config("maskclip_nano"), special_ids=(0, 1, 2), mask_id=3)
    task.train()
    assert task.student.training and not task.teacher.training
    images = torch.randn(4, 3, 32, 32)
    tokens = torch.randint(4, 1000, (4, 32))
    loss, _ = task.training_forward(images, tokens)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert task.student.visual.trunk.blocks[0].attn.qkv.weight.grad is not None


def test_teacher_follows_student_after_update():
    task = MaskCLIPTask(get_config("maskclip_nano"), special_ids=(0, 1, 2), mask_id=3)
    with torch.no_grad():
        for p in task.student.visual.parameters():
            p.add_(0.5)
    t_before = task.teacher["visual"].trunk.pos_embed.clone()
    m = task.update_teacher(0, 10)
    assert m == 0.996
    s = task.student.visual.trunk.pos_embed
    assert torch.allclose(task.teacher["visual"].trunk.pos_embed, m * t_before + (1 - m) * s)
