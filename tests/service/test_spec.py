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


# ---------------------------------------------------------------- no secret by value (issue 15)

PASSWORD = "hunter2-Pq7zX"
MLFLOW_VARS = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
AWS_VARS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
URI_CASES = [
    ("tag", "run: {tags: {team: 'https://u:PW@host'}}", [], "run.tags.team", "https://***@host"),
    (
        "tracking",
        "tracking: {tracking_uri: 'https://u:PW@mlflow.example.com'}",
        [],
        "tracking.tracking_uri",
        MLFLOW_VARS,
    ),
    ("endpoint", "storage: {endpoint_url: 'http://AKIA:PW@minio:9000'}", [], "storage", AWS_VARS),
    ("token-as-user", "tracking: {tracking_uri: 'https://PW@host'}", [], "tracking", MLFLOW_VARS),
    ("bare", "run: {tags: {db: 'admin:PW@db.example.com'}}", [], "run.tags.db", "'***@db."),
    (
        "sweep",
        "sweep: {parameters: {tracking.tracking_uri: {values: ['https://u:PW@h']}}}",
        [],
        "sweep.parameters.tracking.tracking_uri.values[0]",
        MLFLOW_VARS,
    ),
    ("set", "", ["--set", "checkpoint.storage_path=s3://u:PW@bucket/x"], "checkpoint", AWS_VARS),
    ("set-tag", "", ["--set", "run.tags.src=https://u:PW@host"], "run.tags.src", "https://***@"),
]


@pytest.mark.parametrize("name,text,argv,field,hint", URI_CASES, ids=[c[0] for c in URI_CASES])
def test_credentials_in_a_uri_are_refused(tmp_path, capsys, name, text, argv, field, hint):
    """`https://u:p@host` anywhere (a tag, a URI field, a sweep value, a --set): exit 2, one line
    naming the field and where the credentials go instead; the password is nowhere printed."""
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\n{text.replace('PW', PASSWORD)}\n")
    argv = [a.replace("PW", PASSWORD) for a in argv]
    assert main(["validate", str(path), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {field}") and len(err.strip().splitlines()) == 1, err
    assert "credentials in a URI are refused" in err and hint in err, err
    assert "in the environment" in err
    assert PASSWORD not in err and PASSWORD not in out


def test_the_brief_case_u_p_at_host(tmp_path, capsys):
    """The issue's own example, `https://u:p@host`, in a tag and in a URI: two lines, no `u:p`."""
    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: {tmp_path}}}\nrun: {{tags: {{a: 'https://u:p@host'}}}}\n"
        "tracking: {tracking_uri: 'https://u:p@host'}\n"
    )
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert [ln.split(":")[1] for ln in lines] == [" run.tags.a", " tracking.tracking_uri"], lines
    assert "u:p" not in out + err and "p@" not in out + err


def test_tag_key_names_are_scanned(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\nrun: {{tags: {{api_key: abc}}}}\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: run.tags.api_key: credentials never go")


def test_harmless_at_signs_and_small_aliases_pass(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: &d {tmp_path}, val: *d}}\n"
        "run: {tags: {owner: alice@example.com, ref: 's3://bucket/key@v2'}}\n"
        "tracking: {tracking_uri: 'https://mlflow.example.com:5000/p@th'}\n"
    )
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "owner: alice@example.com" in capsys.readouterr().out


def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    names = [f"l{i}" for i in range(levels)]
    lines = [f"  {names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("section", ["sweep", "tags"])
def test_alias_bomb_is_refused_in_under_a_second(tmp_path, capsys, section):
    """9 levels of 10 aliases (~1 KB, 10^9 values expanded) kept the old scan busy past 30 s."""
    import time

    bomb = _alias_bomb()
    head = "sweep:\n" if section == "sweep" else "run:\n tags:\n"
    body = bomb if section == "sweep" else bomb.replace("  ", "   ")
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\n{head}{body}")
    assert path.stat().st_size < 1200
    t0 = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert seconds < 1.0, seconds
    assert err.strip() == (
        "error: (spec): with its YAML aliases expanded the document holds more than 100,000 "
        "keys and values; write the spec without nested aliases"
    )


def test_recursive_alias_is_refused(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\nsweep: &a {{x: *a}}\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: (spec): a YAML alias refers to a node that contains it"
    )


def test_oversized_and_deep_specs_are_refused(tmp_path, capsys):
    from service.spec import MAX_SPEC_BYTES

    path = tmp_path / "big.yaml"
    path.write_text(f"data: {{train: {tmp_path}}}\n" + "#" * MAX_SPEC_BYTES + "\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and "at most 1,048,576" in err and "\n" not in err
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"data: {{train: {tmp_path}}}\nsweep: {{x: {'[' * 100}1{']' * 100}}}\n")
    assert main(["validate", str(deep)]) == 2
    assert capsys.readouterr().err.strip() == "error: (spec): nested deeper than 64 levels"


@pytest.mark.parametrize(
    "command", [["render"], ["submit", "--address", "http://127.0.0.1:9"]], ids=["render", "submit"]
)
def test_render_and_submit_refuse_credentials_before_anything(tmp_path, capsys, command):
    """`render` and `submit` load the spec through the same checks: the refusal comes before
    any manifest is printed or any address is contacted (port 9 has no Jobs API)."""
    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: {tmp_path}}}\nrun: {{tags: {{a: 'https://u:{PASSWORD}@h'}}}}\n"
    )
    argv = [command[0], str(path), "--set", f"tracking.tracking_uri=https://{PASSWORD}@h"]
    assert main([*argv, *command[1:]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and PASSWORD not in err
    assert [ln.split(":")[1] for ln in err.strip().splitlines()] == [
        " run.tags.a",
        " tracking.tracking_uri",
    ]
