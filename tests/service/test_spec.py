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
        "ema_momentum_start must not exceed",
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
