"""The task object: CLIP equivalence with distillation off, and a short run where loss falls."""

import dataclasses

import pytest
import torch

from maskclip import MaskCLIPTask, clip_baseline, get_config
from maskclip.synthetic import generate
from maskclip.tokenizer import Tokenizer
from maskclip.transforms import decode_image, eval_transform


def reference_clip(model, images, tokens):
    """Plain CLIP written out by hand: encode, normalise, symmetric cross-entropy."""
    img = model.visual.proj(model.visual.trunk.forward_features(images)[:, 0])
    txt = model.encode_text(tokens, normalize=False)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(images))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def test_distillation_off_is_exactly_clip_loss_and_gradients():
    cfg = clip_baseline(get_config("maskclip_nano"))
    torch.manual_seed(0)
    task = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)
    images = torch.randn(6, 3, 32, 32)
    tokens = torch.randint(4, 1000, (6, 32))
    tokens[:3, 20:] = 0
    loss, report = task.training_forward(images, tokens)
    assert set(report) == {"loss", "loss_contrastive", "logit_scale"}
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.student.named_parameters()}
    task.zero_grad()
    ref = reference_clip(task.student, images, tokens)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for n, p in task.student.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_distillation_weights_change_the_loss():
    cfg = get_config("maskclip_nano")
    task = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(4, 1000, (4, 32))
    loss, report = task.training_forward(images, tokens, torch.Generator().manual_seed(0))
    expected = (
        report["loss_contrastive"]
        + cfg.distill.image_weight * report["loss_image_distill"]
        + cfg.distill.text_weight * report["loss_text_distill"]
    )
    assert torch.allclose(loss, expected)
    assert report["masked_fraction"] == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("mode", ["efficient", "faithful"])
def test_short_training_run_loss_falls(mode):
    rows = generate(64, image_size=32, seed=0)
    tok = Tokenizer.train([r["caption"] for r in rows], vocab_size=400, context_length=24)
    tf = eval_transform(32)
    images = torch.stack([tf(decode_image(r["jpg"])) for r in rows])
    tokens = tok.encode([r["caption"] for r in rows])
    base = get_config("maskclip_nano", text={"vocab_size": tok.vocab_size, "context_length": 24})
    cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, mode=mode))
    torch.manual_seed(0)
    task = MaskCLIPTask(cfg, special_ids=tok.special_ids, mask_id=tok.mask_id, pad_id=tok.pad_id)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    steps = 30
    for step in range(steps):
        idx = torch.arange(32) + (step % 2) * 32
        loss, report = task.training_forward(images[idx], tokens[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.update_teacher(step, steps)
        losses.append(report["loss_contrastive"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)


def test_multi_mask_views_reuse_one_teacher_pass_per_image():
    """masks_per_image=2: 8 views of 4 images, one teacher pass per image, independent masks;
    the distillation loss equals one-view-per-image on a batch that repeats those images."""
    torch.manual_seed(0)
    cfg = get_config("maskclip_nano", distill={"distill_fraction": 0.5, "masks_per_image": 2})
    multi = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)
    single = MaskCLIPTask(
        dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, masks_per_image=1)),
        special_ids=(0, 1, 2),
        mask_id=3,
    )
    single.load_state_dict(multi.state_dict())
    images = torch.randn(16, 3, 32, 32)
    tokens = torch.randint(4, 1000, (16, 32))
    assert multi.view_sources(8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]

    teacher_batches = []
    multi.teacher["visual"].trunk.patch_embed.register_forward_hook(
        lambda m, args, out: teacher_batches.append(args[0].shape[0])
    )
    masks = []
    multi.student.image_decoder.register_forward_hook(lambda m, args, out: masks.append(args[1]))
    _, report = multi.training_forward(images, tokens, torch.Generator().manual_seed(3))
    assert teacher_batches == [4]
    (mask,) = masks
    assert mask.shape == (8, multi.student.visual.num_patches)
    assert all(not torch.equal(mask[i], mask[i + 1]) for i in range(0, 8, 2))

    repeated = images.clone()
    repeated[:8] = images[torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])]
    _, ref = single.training_forward(repeated, tokens, torch.Generator().manual_seed(3))
    torch.testing.assert_close(report["loss_image_distill"], ref["loss_image_distill"])
