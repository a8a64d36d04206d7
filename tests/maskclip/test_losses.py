"""Contrastive loss: single-process reference equality, and across 2 gloo ranks the
local-loss + gather-with-grad formulation equals the single-process loss and gradients."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from maskclip.losses import (
    PrototypeDistillLoss,
    clip_loss,
    feature_regression_loss,
    normalize_targets,
)


def reference_clip_loss(img, txt, scale):
    """Straightforward symmetric InfoNCE, written independently of the library."""
    n = img.shape[0]
    logits = scale * img @ txt.T
    loss_i = -torch.stack([torch.log_softmax(logits[i], 0)[i] for i in range(n)]).mean()
    loss_t = -torch.stack([torch.log_softmax(logits[:, i], 0)[i] for i in range(n)]).mean()
    return (loss_i + loss_t) / 2


def features(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_single_process_matches_reference():
    img, txt = features()
    scale = torch.tensor(14.3)
    assert torch.allclose(clip_loss(img, txt, scale), reference_clip_loss(img, txt, scale))


def test_perfect_alignment_gives_low_loss():
    img, _ = features()
    assert clip_loss(img, img, torch.tensor(100.0)) < 0.05
    assert clip_loss(img, img.flip(0), torch.tensor(100.0)) > 1.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, local_loss, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt = features(8 * world)
        n = img.shape[0] // world
        img = img[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        txt = txt[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        scale = torch.tensor(14.3, requires_grad=True)
        loss = clip_loss(img, txt, scale, local_loss=local_loss, gather_with_grad=True)
        loss.backward()
        results[rank] = (loss.detach(), img.grad, txt.grad, scale.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_ranks_match_single_process(local_loss):
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), local_loss, results), nprocs=world)
        results = dict(results)
    img, txt = features(8 * world)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(14.3, requires_grad=True)
    ref = reference_clip_loss(img, txt, scale)
    ref.backward()
    n = 8
    mean_loss = sum(r[0] for r in results.values()) / world
    assert torch.allclose(mean_loss, ref, atol=1e-5)
    for rank, (_, g_img, g_txt, _) in results.items():
        # DDP averages gradients over ranks; all_gather's backward sums them into each slice
        assert torch.allclose(g_img / world, img.grad[rank * n : (rank + 1) * n], atol=1e-6)
        assert torch.allclose(g_txt / world, txt.grad[rank * n : (rank + 1) * n], atol=1e-6)
    assert torch.allclose(sum(r[3] for r in results.values()) / world, scale.grad, atol=1e-5)


def test_feature_losses():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    for kind in ("cosine", "smooth_l1"):
        assert feature_regression_loss(target * 3, target, kind) < 1e-6
        assert feature_regression_loss(pred, target, kind) > 0.1
    assert feature_regression_loss(pred[:0], target[:0], "cosine") == 0
    with pytest.raises(ValueError):
        feature_regression_loss(pred, target, "l7")
    normed = normalize_targets(pred * 5 + 2, "layernorm")
    assert torch.allclose(normed.mean(-1), torch.zeros(10), atol=1e-5)
    assert torch.equal(normalize_targets(pred, "none"), pred)


def test_prototype_loss_is_lowest_for_matching_scores_and_updates_center():
    loss_fn = PrototypeDistillLoss(16, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 16, generator=g)
    matched = loss_fn(teacher.clone() * 2, teacher)
    assert not torch.equal(loss_fn.center, torch.zeros(1, 16))
    random = loss_fn(torch.randn(32, 16, generator=g) * 2, teacher)
    assert matched < random
