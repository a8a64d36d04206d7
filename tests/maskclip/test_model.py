"""Shapes for every registered size, the CLIP switch, and the library's import boundary."""

import subprocess
import sys

import pytest
import torch

from maskclip import MaskCLIPTask, clip_baseline, create_model, get_config, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_size_builds_and_runs(name):
    cfg = get_config(name)
    big = cfg.vision.image_size > 64
    device = torch.device("meta") if big else torch.device("cpu")
    with device:
        task = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)
        batch = 2
        images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = torch.randint(4, cfg.text.vocab_size, (batch, cfg.text.context_length))
    out = task.model(images, tokens)
    assert out["image_features"].shape == (batch, cfg.embed_dim)
    assert out["text_features"].shape == (batch, cfg.embed_dim)
    if not big:
        loss, report = task.training_forward(images, tokens.cpu())
        assert torch.isfinite(loss)
        assert {"loss_contrastive", "loss_image_distill", "loss_text_distill"} <= set(report)


def test_vit_b16_is_the_papers_size():
    cfg = get_config("maskclip_vit_b16")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width) == (224, 16, 768)
    assert (cfg.text.depth, cfg.text.width, cfg.text.heads, cfg.text.context_length) == (
        12,
        512,
        8,
        77,
    )
    assert cfg.embed_dim == 512
    with torch.device("meta"):
        model = create_model(cfg)
    vit_params = sum(p.numel() for p in model.visual.trunk.parameters())
    assert 85e6 < vit_params < 87e6  # ViT-B/16 trunk


def test_overrides_and_unknown_names():
    cfg = get_config("maskclip_tiny", distill={"mask_ratio": 0.5}, embed_dim=32)
    assert cfg.distill.mask_ratio == 0.5 and cfg.embed_dim == 32
    with pytest.raises(KeyError, match="no field"):
        get_config("maskclip_tiny", distill={"nope": 1})
    with pytest.raises(KeyError, match="unknown model"):
        get_config("maskclip_huge_nonexistent")


def test_clip_baseline_builds_no_distillation_modules():
    cfg = clip_baseline(get_config("maskclip_nano"))
    task = MaskCLIPTask(cfg)
    assert task.teacher is None
    assert task.student.image_decoder is None and task.student.text_head is None
    assert task.student.visual.mask_token is None


def test_logit_scale_init_and_clamp():
    model = create_model("maskclip_nano")
    assert torch.isclose(model.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert torch.isclose(model.scale(), torch.tensor(100.0))


def test_library_never_imports_service_dependencies():
    code = (
        "import sys, maskclip, maskclip.evaluate, maskclip.tokenizer, maskclip.transforms, "
        "maskclip.synthetic\n"
        "bad = [m for m in ('ray', 'mlflow', 'boto3', 'pydantic') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["faithful", "efficient"])
def test_shared_batch_passes_equal_separate_passes(mode):
    """forward() runs equal-length passes in one batch; each output must equal its own pass."""
    import torch.nn.functional as F

    from maskclip.masking import patch_mask, text_mask

    torch.manual_seed(0)
    cfg = get_config("maskclip_nano", distill={"mode": mode})
    model = create_model(cfg).eval()
    images = torch.randn(6, 3, 32, 32)
    tokens = torch.randint(5, cfg.text.vocab_size, (6, cfg.text.context_length))
    tokens[:, 12:] = 0  # padding
    g = torch.Generator().manual_seed(1)
    b = 4
    mask = patch_mask("random", b, model.visual.grid, 0.5, g)
    masked, tmask = text_mask(tokens[:b], 0.3, (0, 1, 2), 3, g)
    with torch.no_grad():
        out = model(images, tokens, mask, masked, tmask)
        efficient = mode == "efficient"
        enc = model.visual.tokens(images[:b], mask, visible_only=efficient)
        ref = {
            "image_features": F.normalize(model.visual.embed(model.visual.tokens(images)), dim=-1),
            "text_features": F.normalize(
                model.text.embed(model.text.tokens(tokens), tokens), dim=-1
            ),
            "image_pred": model.image_decoder(enc, mask),
            "text_pred": model.text_head(model.text.tokens(masked)[tmask]),
        }
    for key, value in ref.items():
        torch.testing.assert_close(out[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_configs_and_registry_import_without_torch():
    """`maskclip`, its configs and registry load without torch (the service's CLI relies on it);
    the torch modules load on first use of MaskCLIPTask / MaskCLIP."""
    code = (
        "import sys\n"
        "from maskclip import get_config, DistillConfig, ModelConfig\n"
        "import maskclip.config, maskclip.registry\n"
        "get_config('maskclip_tiny', distill={'mask_ratio': 0.5})\n"
        "print('torch' in sys.modules)\n"
        "from maskclip import MaskCLIPTask, MaskCLIP\n"
        "print('torch' in sys.modules, MaskCLIPTask.__module__, MaskCLIP.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "maskclip.task", "maskclip.towers"]


def test_configs_check_their_values():
    """Ranges and choices are declared once on the dataclasses and checked on construction."""
    import dataclasses

    from maskclip.config import ConfigError, DistillConfig, field_docs

    cases = [
        ({"distill": {"mask_ratio": 1.0}}, "mask_ratio: must be < 1 (got 1.0)"),
        (
            {"distill": {"masking": "grid"}},
            "masking: must be one of 'block', 'random' (got 'grid')",
        ),
        ({"distill": {"teacher_temp": 0}}, "teacher_temp: must be > 0 (got 0)"),
        (
            {"distill": {"ema_momentum_start": 0.99, "ema_momentum_end": 0.9}},
            "ema_momentum_start: must not exceed ema_momentum_end 0.9 (got 0.99)",
        ),
        ({"vision": {"image_size": 36}}, "image_size: must be a multiple of the patch size 8"),
        ({"contrastive_weight": -1.0}, "contrastive_weight: must be >= 0 (got -1.0)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            get_config("maskclip_nano", **overrides)
    with pytest.raises(ValueError, match="masks_per_image"):
        DistillConfig(masks_per_image=0)
    docs = field_docs(DistillConfig)
    assert [f.name for f in dataclasses.fields(DistillConfig) if not docs.get(f.name)] == []


def _masked_batch(model, cfg, seed: int = 0):
    from maskclip.masking import patch_mask, text_mask

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = torch.randint(5, cfg.text.vocab_size, (4, cfg.text.context_length), generator=g)
    tokens[:, 10:] = 0  # padding: the text tower's boolean attention mask is in play
    mask = patch_mask("random", 2, model.visual.grid, 0.5, g)
    masked, tmask = text_mask(tokens[:2], 0.3, (0, 1, 2), 3, g)
    return images, tokens, mask, masked, tmask


@pytest.mark.parametrize("mode", ["faithful", "efficient"])
def test_fused_attention_matches_the_math_path(mode):
    """Every attention (vision, text with its padding mask, patch decoder) runs
    F.scaled_dot_product_attention; its outputs equal the explicit softmax(QK^T)V path."""
    from timm.layers.attention import Attention

    from maskclip.towers import set_fused_attention

    torch.manual_seed(0)
    cfg = get_config("maskclip_nano", distill={"mode": mode})
    model = create_model(cfg).eval()
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    expected = cfg.vision.depth + cfg.text.depth + cfg.distill.decoder_depth
    assert len(attns) == expected and all(m.fused_attn for m in attns)
    batch = _masked_batch(model, cfg)
    with torch.no_grad():
        fused = model(*batch)
        assert set_fused_attention(model, False) == expected
        math = model(*batch)
    assert set(fused) == set(math) and "image_pred" in fused and "text_pred" in fused
    for key in fused:
        torch.testing.assert_close(fused[key], math[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("mode", ["faithful", "efficient"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(mode):
    torch.manual_seed(0)
    cfg = get_config("maskclip_nano", distill={"mode": mode})
    task = MaskCLIPTask(cfg, special_ids=(0, 1, 2), mask_id=3)
    images, tokens, *_ = _masked_batch(task.student, cfg)
    kept: list[int] = []

    def loss_and_grads():
        task.student.zero_grad(set_to_none=True)
        saved = []  # tensors autograd keeps for backward: fewer when blocks are recomputed
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss, _ = task.training_forward(images, tokens, torch.Generator().manual_seed(3))
        kept.append(len(saved))
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in task.student.named_parameters() if p.grad is not None
        }

    plain_loss, plain = loss_and_grads()
    task.student.set_grad_checkpointing(True)
    assert task.student.visual.grad_checkpointing and task.student.text.grad_checkpointing
    assert task.student.image_decoder.grad_checkpointing
    ckpt_loss, ckpt = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert kept[1] < kept[0] / 2, kept
    assert set(ckpt) == set(plain) and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_encode_patches_are_the_final_patch_tokens_on_the_grid():
    """Dense evaluation's tokens: the final-norm patch tokens (class token dropped) laid out
    row-major on the patch grid; project=True is the image projection, L2-normalised."""
    torch.manual_seed(0)
    model = create_model("maskclip_nano").eval()  # 32 px, patch 8: a 4x4 grid, width 64
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        patches = model.encode_patches(images)
        projected = model.encode_patches(images, project=True)
        tokens = model.visual.tokens(images)
    assert patches.shape == (3, 4, 4, 64) and projected.shape == (3, 4, 4, model.cfg.embed_dim)
    assert torch.equal(patches[:, 1, 2], tokens[:, 1 + 1 * 4 + 2])  # row 1, column 2
    assert torch.equal(patches.reshape(3, 16, 64), tokens[:, 1:])
    want = torch.nn.functional.normalize(tokens[:, 1:] @ model.visual.proj.weight.T, dim=-1)
    torch.testing.assert_close(projected.reshape(3, 16, -1), want)
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(3, 4, 4))
    assert torch.equal(model.project_patches(patches), projected)


def test_encode_patches_blocks_are_the_tokens_after_that_block():
    """--dense-blocks N: the tokens after the first N blocks (through the final norm); -1 is
    all but the last; the full depth is the default."""
    torch.manual_seed(0)
    model = create_model("maskclip_nano").eval()  # depth 2
    t = model.visual.trunk
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = t.norm_pre(t._pos_embed(t.patch_embed(images)))
        after_first = t.norm(t.blocks[0](x))[:, 1:].reshape(2, 4, 4, -1)
        one = model.encode_patches(images, blocks=1)
        minus_one = model.encode_patches(images, blocks=-1)
        full = model.encode_patches(images, blocks=2)
    torch.testing.assert_close(one, after_first)
    assert torch.equal(one, minus_one)
    assert torch.equal(full, model.encode_patches(images))
    assert not torch.allclose(one, full)
