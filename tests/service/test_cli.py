"""The CLI: light commands load neither torch nor ray, the schema describes every field, and typed
errors map to exit codes in one place (service.cli.main)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from maskclip.config import DistillConfig, field_docs
from service import cli
from service.cli import main
from service.cli import train as train_cmd
from service.errors import (
    CheckpointError,
    ClusterError,
    DataError,
    RunStopped,
    SpecError,
    StopReason,
    UserError,
)

ROOT = Path(__file__).resolve().parents[2]

LIGHT_COMMANDS = [
    ["--help"],
    ["schema"],
    ["validate", "SPEC"],
    ["validate", "jobs/sweep.yaml", "--set", "data.train=DATA", "--set", "data.val=DATA"],
    ["render", "jobs/s3.yaml"],
    *[[name, "--help"] for name in ("submit", "status", "logs", "stop", "list", "render")],
    ["run", "--help"],
    ["sweep", "--help"],
]


def test_light_commands_import_neither_torch_nor_ray(tmp_path):
    """Each command runs in a fresh interpreter; after it, no torch* or ray* module is loaded."""
    spec = tmp_path / "job.yaml"
    spec.write_text(f"data: {{train: {tmp_path}}}\nmodel: {{image_loss: ibot}}\n")
    commands = [
        [str(spec) if a == "SPEC" else a.replace("DATA", str(tmp_path)) for a in argv]
        for argv in LIGHT_COMMANDS
    ]
    script = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        from service.cli import main
        out = []
        for argv in {commands!r}:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    rc = main(argv)
                except SystemExit as e:
                    rc = e.code
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray"))
            out.append([argv, rc, heavy[:5]])
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [(argv, rc, heavy) for argv, rc, heavy in results] == [
        (argv, 0, []) for argv in commands
    ]


def _objects(schema: dict, where: str = "#"):
    """Every object schema with properties, nested ones included."""
    if isinstance(schema, dict):
        if "properties" in schema:
            yield where, schema
        for key, value in schema.items():
            yield from _objects(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _objects(value, f"{where}/{i}")


def test_schema_describes_every_field(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    fields = {
        f"{where}.{name}": (prop.get("description") or "").strip()
        for where, obj in _objects(schema)
        for name, prop in obj["properties"].items()
    }
    assert len(fields) > 80  # every section, the model's library fields and sweep's included
    assert [name for name, text in fields.items() if not text] == []


def test_model_section_is_the_library_dataclass(capsys):
    """Every DistillConfig field is a `model:` key with the library's default and docstring."""
    assert main(["schema"]) == 0
    props = json.loads(capsys.readouterr().out)["$defs"]["ModelSection"]["properties"]
    docs = field_docs(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        assert props[f.name]["default"] == f.default, f.name
        assert props[f.name]["description"] == docs[f.name], f.name
    assert props["image_loss"]["enum"] == ["cosine", "smooth_l1", "ibot"]
    assert props["mask_ratio"]["exclusiveMaximum"] == 1


def test_ibot_settings_reach_the_model_config(tmp_path):
    from service.spec import load_spec

    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: {tmp_path}}}\n"
        "model: {image_loss: ibot, num_prototypes: 64, student_temp: 0.2, teacher_temp: 0.05,\n"
        "        center_momentum: 0.8, image_weight: 0.5, text_weight: 0}\n"
    )
    d = load_spec(path, ["model.teacher_temp=0.06"]).model_config_for(1000).distill
    assert (d.image_loss, d.num_prototypes, d.student_temp, d.teacher_temp) == (
        "ibot",
        64,
        0.2,
        0.06,
    )
    assert (d.center_momentum, d.image_weight, d.text_weight) == (0.8, 0.5, 0.0)


@pytest.mark.parametrize(
    "error,code,lines",
    [
        (SpecError(["model.mask_ratio: bad (got 2)", "optim.lr: bad (got -1)"]), 2, 2),
        (DataError("data.train: no Parquet files at 's3://b/x'"), 2, 1),
        (CheckpointError("runs/x: not a checkpoint folder"), 2, 1),
        (ClusterError("cannot reach the Ray Jobs API at http://127.0.0.1:1"), 2, 1),
        (UserError("rows must be at least 1 (got 0)"), 2, 1),
        (RunStopped(StopReason.SIGNAL, "stopped by SIGTERM at step 7; rerun to resume"), 143, 1),
        (RunStopped(StopReason.INTERRUPT, "interrupted at step 7"), 130, 1),
        (RunStopped(StopReason.DATA, "too many bad rows: 9 of 10"), 2, 1),
        (RunStopped(StopReason.NONFINITE, "loss is nan at step 3"), 1, 1),
        (RunStopped(StopReason.FAILED, "sweep s: all 2 trials failed"), 1, 1),
        (KeyboardInterrupt(), 130, 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_typed_errors_map_to_exit_codes(monkeypatch, capsys, error, code, lines):
    """A command raising each typed error: main prints one `error:` line per problem, never a
    traceback, and exits with the error's code."""

    def raising(args):
        raise error

    monkeypatch.setattr(train_cmd, "cmd_validate", raising)
    assert main(["validate", "job.yaml"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == lines, err
    if isinstance(error, (UserError, RunStopped)):
        expected = error.lines if isinstance(error, UserError) else [str(error)]
        assert err == [f"error: {line}" for line in expected]


def test_spec_errors_one_line_each(tmp_path, capsys):
    """A real spec with three problems (one a renamed key): exit 2, one line per problem."""
    path = tmp_path / "job.yaml"
    path.write_text(
        f"data: {{train: {tmp_path}}}\nmodel: {{image_distill_weight: 0.5}}\n"
        "optim: {lr: -1, batch_size: 0}\n"
    )
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: model.image_distill_weight: renamed to model.image_weight (got 0.5)"
    ]
    path.write_text(
        f"data: {{train: {tmp_path}}}\nmodel: {{image_weight: -1, student_temp: 0}}\n"
        "optim: {lr: -1}\n"
    )
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: model.image_weight: Input should be greater than or equal to 0 (got -1)",
        "error: model.student_temp: Input should be greater than 0 (got 0)",
        "error: optim.lr: Input should be greater than 0 (got -1)",
    ]


def test_cluster_address_error_exits_2_without_ray(capsys):
    """A real UserError from a cluster command, before any connection: exit 2, one line."""
    assert main(["status", "raysubmit_x", "--address", "http://10.1.2.3:8265"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: refusing plain http:// to 10.1.2.3"), err


def test_subcommands_are_registered_statically():
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"run", "validate", "schema", "sweep", "data", "eval", "submit", "render"} <= names
