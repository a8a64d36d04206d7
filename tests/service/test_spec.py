"""Bad specs: every case gives one line naming the field/file, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from service.cli import main

CASES = [
    ("malformed", "model: [unclosed\n", "malformed YAML"),
    ("empty", "", "the spec file is empty"),
    ("list", "- a\n- b\n", "the spec must be a mapping"),
    ("unknown", "data: {train: DATA}\nmodle: {}\n", "modle: unknown key"),
    (
        "type",
        "data: {train: DATA}\noptim: {batch_size: many}\n",
        "optim.batch_size: Input should be a valid integer",
    ),
    (
        "range",
        "data: {train: DATA}\nmodel: {mask_ratio: 0}\n",
        "model.mask_ratio: Input should be greater than 0",
    ),
    (
        "negative",
        "data: {train: DATA}\noptim: {lr: -1}\n",
        "optim.lr: Input should be greater than 0",
    ),
    ("size", "data: {train: DATA}\nmodel: {size: vit_huge}\n", "model.size: unknown model size"),
    ("missing-data", "model: {}\n", "data: required field is missing"),
    ("missing-path", "data: {train: /no/such/folder}\n", "data.train: no such file or directory"),
    (
        "budget",
        "data: {train: DATA}\noptim: {max_steps: null}\n",
        "set exactly one of max_steps and epochs",
    ),
    (
        "secret",
        "data: {train: DATA}\nstorage: {secret_key: abc}\n",
        "credentials never go in the job spec",
    ),
    (
        "token",
        "data: {train: DATA}\ntracking: {api_token: abc}\n",
        "credentials never go in the job spec",
    ),
    (
        "ema",
        "data: {train: DATA}\nmodel: {ema_momentum_start: 0.9, ema_momentum_end: 0.5}\n",
        "model.ema_momentum_start: must not exceed ema_momentum_end 0.5 (got 0.9)",
    ),
    (
        "patch",
        "data: {train: DATA}\nmodel: {size: maskclip_nano, image_size: 36}\n",
        "model.image_size: must be a multiple of the patch size 8 (got 36)",
    ),
    (
        "renamed",
        "data: {train: DATA}\nmodel: {image_distill_weight: 0.0}\n",
        "model.image_distill_weight: renamed to model.image_weight (got 0.0)",
    ),
    (
        "ibot-temp",
        "data: {train: DATA}\nmodel: {image_loss: ibot, teacher_temp: 0}\n",
        "model.teacher_temp: Input should be greater than 0 (got 0)",
    ),
    (
        "choice",
        "data: {train: DATA}\nmodel: {target_norm: batchnorm}\n",
        "model.target_norm: Input should be 'layernorm' or 'none' (got 'batchnorm')",
    ),
    (
        "masks",
        "data: {train: DATA}\nmodel: {masks_per_image: 0}\n",
        "model.masks_per_image: Input should be greater than 0",
    ),
    ("python-object", "data: !!python/object/apply:os.system ['echo hacked']\n", "malformed YAML"),
]


@pytest.mark.parametrize("name,text,message", CASES, ids=[c[0] for c in CASES])
def test_bad_spec(tmp_path, capsys, name, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text.replace("DATA", str(tmp_path)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "hacked" not in capsys.readouterr().out


def test_missing_spec_file(capsys):
    assert main(["validate", "/no/such/job.yaml"]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_non_utf8_spec(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["validate", str(path)]) == 2
    assert "job.yaml" in capsys.readouterr().err


def test_bad_override(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\n")
    assert main(["validate", str(path), "--set", "model.mask_ratio=2"]) == 2
    assert "model.mask_ratio" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "model.text_distill_weight=0"]) == 2
    assert capsys.readouterr().err == (
        "error: model.text_distill_weight: renamed to model.text_weight (got 0)\n"
    )
    assert main(["validate", str(path), "--set", "nonsense"]) == 2
    assert "expected dotted.path=value" in capsys.readouterr().err
    path.write_text(f"data: {{train: {tmp_path}}}\nmodel: {{mask_ratio: 0.5}}\n")
    assert main(["validate", str(path), "--set", "model.mask_ratio.x=1"]) == 2
    assert "model.mask_ratio: is not a section" in capsys.readouterr().err


def test_resolved_spec_loads_back(tmp_path, capsys):
    """What `validate` prints (and every run saves) is itself a valid spec."""
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\n")
    assert main(["validate", str(path)]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert main(["validate", str(resolved)]) == 0


def test_model_settings_round_trip_to_the_library(tmp_path, capsys):
    """Every `model:` key set in a spec reaches the library's ModelConfig, and what `validate`
    prints loads back to the same config (the spec holds no second copy of the defaults)."""
    import dataclasses

    from maskclip.config import DistillConfig
    from service.spec import load_spec

    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: {tmp_path}}}\n"
        "model: {size: maskclip_nano, image_size: 48, context_length: 20, contrastive_weight: 2,\n"
        "        mode: faithful, num_prototypes: 32, center_momentum: 0.5}\n"
    )
    cfg = load_spec(path).model_config_for(777)
    assert (cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size) == (48, 20, 777)
    assert (cfg.contrastive_weight, cfg.distill.mode) == (2.0, "faithful")
    assert (cfg.distill.num_prototypes, cfg.distill.center_momentum) == (32, 0.5)
    assert cfg.distill.mask_ratio == DistillConfig().mask_ratio
    assert main(["validate", str(path)]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_spec(resolved).model_config_for(777) == cfg
    assert {f.name for f in dataclasses.fields(DistillConfig)} <= set(
        load_spec(resolved).model.model_dump()
    )
