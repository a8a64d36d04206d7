"""`train_step`: the one optimisation step the per-worker loop and the benchmark both run."""

from __future__ import annotations

import copy

import torch

from maskclip import MaskCLIPTask
from maskclip.tokenizer import Tokenizer
from service.spec import build_spec
from service.train_loop import build_optimizer, build_scheduler, train_step


def _setup(tmp_path, **optim):
    spec = build_spec(
        {"data": {"train": str(tmp_path)}, "model": {"size": "maskclip_nano"}, "optim": optim}
    )
    tok = Tokenizer.train(["a red circle", "a blue square on the left"], 300, 32)
    task = MaskCLIPTask(
        spec.model_config_for(tok.vocab_size), tok.special_ids, tok.mask_id, pad_id=tok.pad_id
    )
    opt = build_optimizer(task, spec)
    return spec, tok, task, opt, build_scheduler(opt, spec, 10)


def _batch(tok):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), tok.encode(["a red circle"] * 4)


def _params(task):
    return {k: v.clone() for k, v in task.student.state_dict().items()}


def test_a_step_is_forward_backward_clip_update_and_ema(tmp_path):
    spec, tok, task, opt, sched = _setup(tmp_path, warmup_steps=0)
    images, tokens = _batch(tok)
    manual = copy.deepcopy(task)
    manual_opt = build_optimizer(manual, spec)
    manual_sched = build_scheduler(manual_opt, spec, 10)

    out = train_step(
        task,
        opt,
        sched,
        images,
        tokens,
        torch.Generator().manual_seed(0),
        step=0,
        total_steps=10,
        grad_clip=1.0,
    )
    loss, _ = manual.training_forward(images, tokens, torch.Generator().manual_seed(0))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(manual.student.parameters(), 1.0)
    manual_opt.step()
    manual_sched.step()
    manual.update_teacher(1, 10)

    assert out.applied and out.grad_norm == float(norm)
    assert float(out.report["loss"]) == float(loss)
    for k, v in task.state_dict().items():
        assert torch.equal(v, manual.state_dict()[k]), k


def test_a_nonfinite_loss_or_a_stop_updates_nothing(tmp_path):
    spec, tok, task, opt, sched = _setup(tmp_path)
    images, tokens = _batch(tok)
    before = _params(task)
    out = train_step(
        task,
        opt,
        sched,
        images,
        tokens,
        torch.Generator().manual_seed(0),
        step=0,
        total_steps=10,
        stop=True,
    )
    assert not out.applied and out.stop and not out.nonfinite
    images[0, 0, 0, 0] = float("nan")
    out = train_step(
        task, opt, sched, images, tokens, torch.Generator().manual_seed(0), step=0, total_steps=10
    )
    assert not out.applied and out.nonfinite
    assert all(torch.equal(v, before[k]) for k, v in _params(task).items())
    assert sched.last_epoch == 0
