"""`maskclip eval` / service.evaluation on a checkpoint built without Ray (nano model)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from maskclip import MaskCLIPTask
from maskclip.synthetic import class_names, generate
from maskclip.templates import templates
from maskclip.tokenizer import Tokenizer
from service import checkpoint as ckpt
from service.cli import main
from service.datasets import write_shards
from service.errors import SpecError
from service.evaluation import evaluate, resolve_checkpoint
from service.spec import build_spec


def _spec(tmp: Path, data: str):
    return build_spec(
        {
            "run": {"name": "evaltest", "output_dir": str(tmp / "runs")},
            "model": {"size": "maskclip_nano", "vocab_size": 300},
            "data": {"train": data},
            "optim": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1},
            "tracking": {"enabled": False},
        }
    )


def _save(directory: Path, spec, tok: Tokenizer, step: int = 3, run_id: str | None = None):
    torch.manual_seed(0)
    cfg = spec.model_config_for(tok.vocab_size)
    task = MaskCLIPTask(cfg, tok.special_ids, tok.mask_id, pad_id=tok.pad_id)
    opt = torch.optim.AdamW(task.student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save(directory, task, opt, sched, step, 0, tok.to_json(), spec.to_yaml(), run_id)
    return task


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A labelled dataset root (train/ 96 rows, test/ 48 rows) and a saved nano checkpoint."""
    tmp = tmp_path_factory.mktemp("evalworld")
    root = tmp / "shapes"
    write_shards(iter(generate(96, 32, seed=0)), str(root / "train"), 48, progress=False)
    write_shards(iter(generate(48, 32, seed=0, start=96)), str(root / "test"), 48, progress=False)
    rows = generate(96, 32, seed=0)
    tok = Tokenizer.train([r["caption"] for r in rows], vocab_size=300, context_length=32)
    spec = _spec(tmp, str(root / "train"))
    run_dir = tmp / "checkpoints" / "evaltest"
    task = _save(run_dir / "checkpoint_000000", spec, tok)
    return {
        "tmp": tmp,
        "root": root,
        "test": str(root / "test"),
        "tok": tok,
        "spec": spec,
        "run_dir": run_dir,
        "ckpt": str(run_dir / "checkpoint_000000"),
        "task": task,
    }


def _in_unit(metrics: dict) -> None:
    for k, v in metrics.items():
        assert 0.0 <= v <= 1.0, (k, v)


def test_evaluate_all_metrics(world):
    r = evaluate(
        world["ckpt"],
        zero_shot=world["test"],
        retrieval=world["test"],
        linear_probe=str(world["root"]),
        batch_size=32,
        log_mlflow=False,
    )
    m = r["metrics"]
    for key in (
        "zero_shot_top1",
        "zero_shot_top5",
        "image_to_text_R1",
        "text_to_image_R10",
        "linear_probe_top1",
    ):
        assert key in m
    _in_unit(m)
    assert m["zero_shot_top5"] >= m["zero_shot_top1"]
    assert r["rows"] == {
        "zero_shot": 48,
        "retrieval": 48,
        "linear_probe_train": 96,
        "linear_probe_test": 48,
    }
    cm = r["zero_shot"]["confusion_matrix"]
    assert sum(map(sum, cm)) == 48 and set(r["zero_shot"]["class_names"]) <= set(class_names())
    assert r["checkpoint"]["step"] == 3
    # max_rows caps every split; a separate retrieval set is read on its own
    r2 = evaluate(
        world["ckpt"], retrieval=str(world["root"] / "train"), max_rows=20, log_mlflow=False
    )
    assert r2["rows"] == {"retrieval": 20}
    _in_unit(r2["metrics"])


def test_run_folder_picks_newest_complete(world, tmp_path):
    run = tmp_path / "run"
    for name, step in (
        ("checkpoint_000000", 1),
        ("checkpoint_000001", 7),
        ("checkpoint_000002", 9),
    ):
        shutil.copytree(world["ckpt"], run / name)
        meta = json.loads((run / name / "meta.json").read_text())
        (run / name / "meta.json").write_text(json.dumps({**meta, "step": step}))
    (run / "checkpoint_000002" / "meta.json").unlink()  # an interrupted write: never picked
    assert Path(resolve_checkpoint(str(run))).name == "checkpoint_000001"


def test_model_artifact_folder_matches_checkpoint(world, tmp_path):
    """A `model/` artifact folder (the checkpoint format without training state) evaluates
    exactly like the checkpoint it was written from."""
    model = tmp_path / "artifacts" / "model"
    tok, spec = world["tok"], world["spec"]
    ckpt.save(
        model,
        world["task"],
        None,
        None,
        3,
        0,
        tok.to_json(),
        spec.to_yaml(),
        None,
        training_state=False,
    )
    a = evaluate(world["ckpt"], zero_shot=world["test"], log_mlflow=False)
    b = evaluate(str(model.parent), zero_shot=world["test"], log_mlflow=False)
    assert b["checkpoint"]["kind"] == "model"
    assert a["metrics"] == b["metrics"]


def test_tokenizer_round_trips_with_checkpoint(world):
    _, tok, _ = ckpt.load_model(world["ckpt"])
    prompts = [t.format(c) for c in class_names() for t in templates("shapes")]
    assert torch.equal(tok.encode(prompts), world["tok"].encode(prompts))
    assert tok.vocab_size == world["tok"].vocab_size and tok.special_ids == world["tok"].special_ids


def test_cli_prints_zero_shot_line(world, capsys):
    rc = main(
        [
            "eval",
            world["ckpt"],
            "--zero-shot",
            world["test"],
            "--retrieval",
            world["test"],
            "--no-mlflow",
            "--batch-size",
            "16",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^zero-shot top-1: \d\.\d{3}$", out, re.M), out


@pytest.mark.parametrize("ref", ["does/not/exist", "s3:/", "ftp://x/y", "EMPTY"])
def test_cli_bad_reference_exits_2(world, capsys, tmp_path, ref):
    if ref == "EMPTY":
        ref = str(tmp_path)
    rc = main(["eval", ref, "--zero-shot", world["test"], "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_bad_templates_and_missing_labels_exit_2(world, tmp_path, capsys):
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a thing\n")
    assert (
        main(
            [
                "eval",
                world["ckpt"],
                "--zero-shot",
                world["test"],
                "--templates",
                str(bad),
                "--no-mlflow",
            ]
        )
        == 2
    )
    nolabel = tmp_path / "nolabel"
    rows = [{k: v for k, v in r.items() if k != "label"} for r in generate(8, 32)]
    write_shards(iter(rows), str(nolabel), progress=False)
    assert main(["eval", world["ckpt"], "--zero-shot", str(nolabel), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "label" in err and "{}" in err


def test_mlflow_logs_into_evaluated_run_and_survives_down_server(
    world, tmp_path, monkeypatch, capsys
):
    import mlflow

    from service.tracking import start_run
    from tests.service.data_fixtures import make_dense_dataset

    # a file store: no sqlite migrations (slow), artifacts stay inside tmp_path
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    client = mlflow.MlflowClient(uri)
    run_id = start_run(uri, "evaltest", "evaltest", {}, {})
    assert run_id
    d = tmp_path / "ck"
    _save(d, world["spec"], world["tok"], step=5, run_id=run_id)
    dense = make_dense_dataset(tmp_path, rows=8, test_rows=4)
    r = evaluate(
        str(d),
        zero_shot=world["test"],
        dense_probe=str(dense),
        zero_shot_seg=str(dense),
        tracking_uri=uri,
    )
    assert r["mlflow"] == {"uri": uri, "run_id": run_id, "logged": True}
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval_zero_shot_top1"] == pytest.approx(r["metrics"]["zero_shot_top1"])
    for name in ("dense_probe_miou", "dense_probe_pixel_accuracy", "zero_shot_seg_miou"):
        assert metrics[f"eval_{name}"] == pytest.approx(r["metrics"][name])
    arts = {a.path: a for a in client.list_artifacts(run_id, "eval")}
    assert "eval/zero_shot_confusion.png" in arts
    # one dense figure: the probe's and zero-shot seg's test split is the same (dense/test)
    assert "eval/segmentation_0.png" in arts and "eval/segmentation_1.png" not in arts
    png = Path(client.download_artifacts(run_id, "eval/segmentation_0.png", str(tmp_path)))
    from PIL import Image

    with Image.open(png) as im:  # 4 rows (images) x 4 columns (image, truth, 2 predictions)
        assert im.size[0] > 500 and im.size[1] > 600, im.size

    # a checkpoint without a run id gets a new eval run, tagged with its source
    r2 = evaluate(world["ckpt"], zero_shot=world["test"], tracking_uri=uri)
    tags = client.get_run(r2["mlflow"]["run_id"]).data.tags
    assert (
        r2["mlflow"]["run_id"] != run_id and tags["maskclip.evaluated_checkpoint"] == world["ckpt"]
    )

    # a server that does not answer: one warning, the evaluation still returns
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    capsys.readouterr()
    r3 = evaluate(world["ckpt"], zero_shot=world["test"], tracking_uri="http://127.0.0.1:9")
    assert not r3["mlflow"]["logged"] and "zero_shot_top1" in r3["metrics"]
    assert capsys.readouterr().err.count("warning: MLflow") == 1


def test_s3_run_folder_is_downloaded(world, s3_bucket):
    import pyarrow.fs as pafs

    from service.evaluation import _s3_fs

    fs = _s3_fs(None)
    dest = f"{s3_bucket}/ckpts/evaltest/checkpoint_000000"
    pafs.copy_files(
        world["ckpt"], dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )
    local = Path(resolve_checkpoint(f"s3://{s3_bucket}/ckpts/evaltest"))
    assert (local / "meta.json").is_file() and (local / "model.safetensors").is_file()
    assert ckpt.read_meta(local)["step"] == 3
    with pytest.raises(Exception, match="nothing at this S3 location"):
        resolve_checkpoint(f"s3://{s3_bucket}/ckpts/missing")


# ---------------------------------------------------------------- one evaluation path


@pytest.fixture(scope="module")
def val_with_bad_rows(world):
    """40 shape rows + 4 bad ones (null label, blank label, empty caption, corrupt image) and two
    rows whose caption repeats row 0's (identical strings: one retrieval candidate)."""
    from tests.service.data_fixtures import write_parquet_shards

    rows = generate(40, 32, seed=5)
    rows[3]["label"] = None
    rows[7]["label"] = "  "
    rows[11]["caption"] = ""
    rows[15]["jpg"] = b"not an image"
    rows[20]["caption"] = rows[21]["caption"] = rows[0]["caption"]
    out = world["tmp"] / "val_bad"
    write_parquet_shards(iter(rows), str(out), rows_per_shard=16)
    return str(out)


def test_rows_rules_and_caption_grouping(world, val_with_bad_rows):
    """Bad rows (service.rows) are skipped and counted; a null or blank label is a bad row, never
    a class named ""; zero-shot and retrieval on one source use the same 36 rows."""
    from service.evaluation import Columns, encode_source, evaluate_model
    from service.storage import resolve_source

    model, tok = world["task"].student, world["tok"]
    r = evaluate_model(
        model, tok, zero_shot=val_with_bad_rows, retrieval=val_with_bad_rows, templates="shapes"
    )
    assert r.rows == {"zero_shot": 36, "retrieval": 36}
    assert r.skipped == {
        "zero-shot": {
            "missing label": 2,
            "empty caption": 1,
            "corrupt image": 1,
        }
    }
    assert "" not in r.zero_shot["class_names"]
    assert sum(r.zero_shot["predicted"]) == 36
    source = resolve_source(val_with_bad_rows, field="data.val")
    feats = encode_source(
        model,
        tok,
        source,
        columns=Columns(),
        captions=True,
        labels=False,
        max_rows=None,
        batch_size=7,
        device=torch.device("cpu"),
    )
    assert len(feats.captions) == 38  # labels not asked for: the two label-less rows count
    ids = feats.caption_ids()
    assert len(set(ids)) == 36 and ids[0] == ids[feats.captions.index(feats.captions[0], 1)]
    # the cap is on usable rows, in file order
    capped = evaluate_model(model, tok, retrieval=val_with_bad_rows, max_rows=12)
    assert capped.rows == {"retrieval": 12}


def test_in_loop_validate_equals_maskclip_eval(
    world, val_with_bad_rows, dense_root, tmp_path, capsys
):
    """`validate` (in-loop, on the live student) and `maskclip eval` on the checkpoint saved
    from it give identical numbers: same rows, templates (the spec's), caption grouping, cap,
    and the dense probe / zero-shot segmentation of data.dense_probe / data.zero_shot_seg."""
    from service.evaluation import validate
    from service.sweep_spec import VAL_METRICS

    dense = str(dense_root)
    spec = world["spec"].model_copy(
        update={
            "data": world["spec"].data.model_copy(
                update={
                    "val": val_with_bad_rows,
                    "templates": ["a {} drawn", "one {}"],
                    "dense_probe": dense,
                    "zero_shot_seg": dense,
                }
            )
        }
    )
    task, tok = world["task"], world["tok"]
    task.train()
    in_loop = validate(spec, task.student, tok, torch.device("cpu"))
    assert task.student.training  # validation puts the model back in the mode it was in
    assert set(in_loop) == set(VAL_METRICS)  # the sweep's metric choices are real metrics
    d = tmp_path / "final"
    ckpt.save(d, task, None, None, 4, 0, tok.to_json(), spec.to_yaml(), None)
    offline = evaluate(
        str(d),
        zero_shot=val_with_bad_rows,
        retrieval=val_with_bad_rows,
        dense_probe=dense,
        zero_shot_seg=dense,
        log_mlflow=False,
    )
    assert offline["zero_shot"]["templates"] == ["a {} drawn", "one {}"]
    named = {f"val_{k}": v for k, v in offline["metrics"].items()}
    assert named == in_loop  # exactly, under the names MLflow and sweep.metric use
    assert in_loop["val_dense_probe_miou"] > 0  # really measured (a fit, not an empty set)
    # the dense part alone: validate needs no data.val for it, and the numbers do not move
    dense_only = spec.model_copy(update={"data": spec.data.model_copy(update={"val": None})})
    alone = validate(dense_only, task.student, tok, torch.device("cpu"))
    assert alone == {k: v for k, v in in_loop.items() if "dense" in k or "seg" in k}
    assert set(alone) == {
        "val_dense_probe_miou",
        "val_dense_probe_pixel_accuracy",
        "val_zero_shot_seg_miou",
        "val_zero_shot_seg_pixel_accuracy",
    }
    # --templates overrides the spec's
    other = evaluate(str(d), zero_shot=val_with_bad_rows, templates="default", log_mlflow=False)
    assert other["zero_shot"]["templates"] == templates("default")
    capsys.readouterr()
    val = val_with_bad_rows
    assert main(["eval", str(d), "--zero-shot", val, "--retrieval", val, "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert f"zero-shot top-1: {in_loop['val_zero_shot_top1']:.3f}" in out
    skipped = (
        "zero-shot: skipped 4 bad row(s) (corrupt image: 1, empty caption: 1, missing label: 2)"
    )
    assert skipped in out
    # zero-shot alone needs no caption: the row with an empty caption counts there
    assert main(["eval", str(d), "--zero-shot", val, "--no-mlflow"]) == 0
    assert "zero-shot: skipped 3 bad row(s) (corrupt image: 1, missing label: 2)" in (
        capsys.readouterr().out
    )


def test_templates_set_name_and_bad_value(world, tmp_path, capsys):
    r = evaluate(
        world["ckpt"], zero_shot=world["test"], templates="fashion-mnist", log_mlflow=False
    )
    assert r["zero_shot"]["templates"] == templates("fashion-mnist")
    rc = main(["eval", world["ckpt"], "--zero-shot", world["test"], "--templates", "nope"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (
        "error: --templates nope: neither a file nor a template set "
        "(default, shapes, fashion-mnist)"
    )


def test_fashion_mnist_prompts_are_its_caption_templates():
    """One source: `data convert --fashion-mnist` captions and the "fashion-mnist" prompt set."""
    from maskclip.templates import FASHION_MNIST_CAPTIONS
    from service.datasets import FASHION_MNIST_TEMPLATES

    assert FASHION_MNIST_TEMPLATES is FASHION_MNIST_CAPTIONS  # one source, not a copy
    assert templates("fashion-mnist")[0] == FASHION_MNIST_CAPTIONS[0].format(a="a", c="{}")


@pytest.mark.slow
def test_run_final_validation_equals_eval_of_final_checkpoint(
    ray_local, world, val_with_bad_rows, dense_root
):
    """A real `maskclip run` (Ray Train): its final in-loop validation metrics and `maskclip eval`
    on its final checkpoint with the same data are identical, the dense ones included."""
    from service.trainer import run_job

    spec = build_spec(
        {
            "run": {"name": "evalsame", "output_dir": str(world["tmp"] / "runs-same")},
            "model": {"size": "maskclip_nano", "vocab_size": 300},
            "data": {
                "train": str(world["root"] / "train"),
                "val": val_with_bad_rows,
                "templates": "shapes",
                "dense_probe": str(dense_root),
                "zero_shot_seg": str(dense_root),
            },
            "optim": {"batch_size": 16, "max_steps": 4, "warmup_steps": 1},
            "checkpoint": {"every_steps": 4},
            "tracking": {"enabled": False},
        }
    )
    result = run_job(spec)
    in_loop = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
    assert in_loop and result.metrics["step"] == 4
    assert "val_dense_probe_miou" in in_loop and "val_zero_shot_seg_miou" in in_loop
    offline = evaluate(
        result.checkpoint.path,
        zero_shot=val_with_bad_rows,
        retrieval=val_with_bad_rows,
        dense_probe=str(dense_root),
        zero_shot_seg=str(dense_root),
        log_mlflow=False,
    )
    assert offline["checkpoint"]["step"] == 4
    assert {f"val_{k}": v for k, v in offline["metrics"].items()} == in_loop


@pytest.mark.slow
def test_demo_zero_shot_clearly_above_chance(ray_local, tmp_path):
    """`make demo`'s setting: `maskclip data synth` data and jobs/quickstart.yaml (its model,
    optimiser, label column and templates), on 2,000 rows for 160 steps instead of 6,000 for
    200 (at 80 steps one run gave 0.30, another above 0.375: too close to call). Its headline metric, in-loop zero-shot top-1 over the 8 shape colours, must be clearly
    above chance (1/8); over the shape names it sat at chance (0.12 after the full demo)."""
    from service import datasets
    from service.spec import load_spec
    from service.trainer import run_job

    repo = Path(__file__).resolve().parents[2]
    datasets.synth(str(tmp_path / "shapes"), 2000, val_rows=256, progress=False)
    spec = load_spec(
        repo / "jobs" / "quickstart.yaml",
        [
            f"data.train={tmp_path / 'shapes' / 'train'}",
            f"data.val={tmp_path / 'shapes' / 'val'}",
            f"run.output_dir={tmp_path / 'runs'}",
            "optim.max_steps=160",
            "tracking.enabled=false",
        ],
    )
    assert spec.data.label_column == "colour" and spec.data.templates == "shapes"
    metrics = run_job(spec).metrics
    assert metrics["val_zero_shot_top1"] > 3 / 8, metrics


# ---------------------------------------------------------------- dense evaluation


@pytest.fixture(scope="module")
def dense_root(world):
    """Multi-object shape scenes with masks (maskclip.dense format): train/ 16 rows, test/ 8."""
    from tests.service.data_fixtures import make_dense_dataset

    return make_dense_dataset(world["tmp"], rows=16, test_rows=8)


_DENSE_LINES = {
    "dense_probe_miou": "dense-probe mIoU",
    "dense_probe_pixel_accuracy": "dense-probe pixel accuracy",
    "dense_probe_pixels_miou": "dense-probe mIoU, raw-pixel baseline",
    "dense_probe_random_miou": "dense-probe mIoU, random-init baseline",
    "zero_shot_seg_miou": "zero-shot seg mIoU",
    "zero_shot_seg_pixel_accuracy": "zero-shot seg pixel accuracy",
}


def test_cli_dense_probe_and_zero_shot_seg(world, dense_root, tmp_path, capsys):
    """`maskclip eval CKPT --dense-probe DIR --zero-shot-seg DIR` prints one line per dense
    metric, the same numbers as its --json; zero-shot seg on a root reads its test/ split."""
    from service.evaluation import evaluate_model

    out_json = tmp_path / "r.json"
    args = ["eval", world["ckpt"], "--dense-probe", str(dense_root)]
    args += ["--zero-shot-seg", str(dense_root), "--no-mlflow", "--json", str(out_json)]
    rc = main([*args, "--dense-baseline", "pixels", "--dense-baseline", "random"])
    out = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out_json.read_text())
    m = r["metrics"]
    for key, label in _DENSE_LINES.items():
        found = re.findall(rf"^{re.escape(label)}: (\d\.\d{{3}})$", out, re.M)
        assert found == [f"{m[key]:.3f}"], (label, out)
        assert 0.0 <= m[key] <= 1.0
    assert r["rows"] == {"dense_probe_train": 16, "dense_probe_test": 8, "zero_shot_seg": 8}
    dense = r["dense"]
    assert dense["classes"][0] == "background" and len(dense["classes"]) == 9
    assert dense["dense_probe"]["train_patches"] == 16 * 16  # 4x4 patches, every one labelled
    assert set(dense["dense_probe"]["iou"]) == set(dense["classes"])
    cm = dense["zero_shot_seg"]["confusion_matrix"]
    assert 0 < sum(map(sum, cm)) <= 8 * 32 * 32  # labelled pixels of the 8 test images
    # the checkpoint is an untrained student built under seed 0: the random-init baseline (the
    # same config, seed 0) is that very model, while raw pixels are another probe
    assert m["dense_probe_random_miou"] == m["dense_probe_miou"]
    assert m["dense_probe_pixels_miou"] != m["dense_probe_miou"]
    # the split folder itself gives what the root (its test/) gave
    split = evaluate_model(
        world["task"].student,
        world["tok"],
        zero_shot_seg=str(dense_root / "test"),
        templates=world["spec"].data.templates,
    )
    assert split.metrics["zero_shot_seg_miou"] == m["zero_shot_seg_miou"]
    # a baseline without the probe is refused in one line
    assert (
        main(
            ["eval", world["ckpt"], "--zero-shot-seg", str(dense_root)]
            + ["--dense-baseline", "pixels", "--no-mlflow"]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        "error: --dense-baseline needs --dense-probe (the baselines are probe numbers)"
    )


def _bad_dense(tmp: Path, case: str) -> tuple[Path, str]:
    """A dense root whose train/ breaks the format in one way -> (root, the error's tail)."""
    import numpy as np

    from maskclip.dense import encode_mask
    from maskclip.synthetic import generate_scenes, scene_classes
    from tests.service.data_fixtures import write_dense_split, write_parquet_shards

    rows = generate_scenes(4, 32, seed=3)
    root = tmp / case
    classes = scene_classes()
    write_dense_split(root / "test", rows, classes)
    train = root / "train"
    if case == "no-classes":
        write_dense_split(train, rows, None)
        return root, (
            f"no classes.txt in {train} (a dense-labelled folder names its classes there, "
            "line i = class i)"
        )
    if case == "no-mask-column":
        write_parquet_shards(iter(rows), str(train), 10)  # key, jpg, caption, label only
        return root, (
            f"column 'mask' not found in {train / 'shard-00000.parquet'} "
            "(columns: key, jpg, caption, label)"
        )
    bad = [dict(r) for r in rows]
    if case == "wrong-size":
        bad[2]["mask"] = encode_mask(np.zeros((16, 24), np.uint8))
        tail = "row 2 (key '000000002'): mask is 24x16 but its image is 32x32"
    else:  # class index past the list (9 classes: 0..8)
        m = np.zeros((32, 32), np.uint8)
        m[5, 7] = 9
        bad[1]["mask"] = encode_mask(m)
        tail = (
            "row 1 (key '000000001'): mask has class index 9 but classes.txt lists 9 classes "
            "(0..8, 255 = ignore)"
        )
    write_dense_split(train, bad, classes)
    return root, f"{train / 'part-00000.parquet'} {tail}"


def test_cli_dense_blocks_probes_an_earlier_layer(world, dense_root, tmp_path, capsys):
    """--dense-blocks N probes the tokens after block N (the model's and the random-init
    baseline's); zero-shot seg stays on the final layer; a depth the tower lacks is one line."""
    runs = {}
    for blocks in (None, 1):
        out_json = tmp_path / f"b{blocks}.json"
        args = ["eval", world["ckpt"], "--dense-probe", str(dense_root), "--zero-shot-seg"]
        args += [str(dense_root), "--no-mlflow", "--json", str(out_json)]
        args += ["--dense-baseline", "random"]
        if blocks is not None:
            args += ["--dense-blocks", str(blocks)]
        assert main(args) == 0
        capsys.readouterr()
        runs[blocks] = json.loads(out_json.read_text())
    full, first = runs[None]["metrics"], runs[1]["metrics"]
    assert runs[1]["dense"]["blocks"] == 1 and runs[None]["dense"]["blocks"] is None
    assert first["dense_probe_miou"] != full["dense_probe_miou"]
    assert first["dense_probe_random_miou"] == first["dense_probe_miou"]  # same init, same layer
    assert first["zero_shot_seg_miou"] == full["zero_shot_seg_miou"]
    depth = len(world["task"].student.visual.trunk.blocks)
    rc = main(["eval", world["ckpt"], "--dense-probe", str(dense_root), "--dense-blocks", "99"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"error: dense blocks 99: the image tower has {depth} blocks "
        f"(1..{depth}, or -1..-{depth - 1} for all but the last few)"
    )


@pytest.mark.parametrize("case", ["no-classes", "wrong-size", "class-index", "no-mask-column"])
def test_cli_dense_format_errors_exit_2(world, tmp_path, capsys, case):
    root, tail = _bad_dense(tmp_path, case)
    rc = main(["eval", world["ckpt"], "--dense-probe", str(root), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == f"error: dense-probe train: {tail}"


def test_dense_masks_get_the_image_geometry(world, tmp_path):
    """A 64x48 image whose colour is its class: after the eval transform (shorter side to 32,
    centre crop) every mask pixel still sits on its class's colour (the mask took the same
    resize and crop, nearest); IGNORE pixels stay IGNORE and are never a class."""
    import io

    import numpy as np
    from PIL import Image

    from maskclip.dense import IGNORE, encode_mask
    from service.evaluation import Columns, encode_dense_source
    from service.storage import resolve_source
    from tests.service.data_fixtures import write_dense_split

    mask = np.zeros((48, 64), np.uint8)
    mask[:, 20:40] = 1
    mask[30:, :] = 2
    mask[:4, :] = IGNORE
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    img = palette[np.minimum(mask, 2)]
    img[mask == IGNORE] = 128
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    rec = {"key": "a", "jpg": buf.getvalue(), "caption": "x", "mask": encode_mask(mask)}
    write_dense_split(tmp_path / "g", [rec], ["red", "green", "blue"])
    split = encode_dense_source(
        world["task"].student,
        resolve_source(str(tmp_path / "g"), field="g"),
        columns=Columns(),
        max_rows=None,
        batch_size=4,
        device=torch.device("cpu"),
        baselines=("pixels",),
    )
    m = split.masks[0]
    assert m.shape == (32, 32) and set(m.unique().tolist()) == {0, 1, 2, IGNORE}
    assert split.features["tokens"].shape == (1, 4, 4, 64)
    assert split.features["pixels"].shape == (1, 4, 4, 3 * 8 * 8)
    from maskclip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    rgb = split.images[0] * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + mean
    colour = rgb.argmax(dim=0)  # 0 red, 1 green, 2 blue (bicubic blurs edges: inner pixels)
    labelled = m != IGNORE
    inner = labelled.clone()
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        inner &= torch.roll(m, (dy, dx), (0, 1)) == m
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    assert inner.sum() > 500
    assert torch.equal(colour[inner], m[inner].long())
    assert (rgb[:, m == IGNORE].mean(dim=0) - 128 / 255).abs().max() < 0.15  # grey under IGNORE


def test_dense_from_s3_equals_local(world, dense_root, s3_bucket):
    import pyarrow.fs as pafs

    from service.evaluation import _s3_fs, evaluate_model

    pafs.copy_files(
        str(dense_root),
        f"{s3_bucket}/dense",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=_s3_fs(None),
    )
    model, tok = world["task"].student, world["tok"]
    kw = {"templates": "shapes"}
    local = evaluate_model(
        model, tok, dense_probe=str(dense_root), zero_shot_seg=str(dense_root), **kw
    )
    uri = f"s3://{s3_bucket}/dense"
    remote = evaluate_model(model, tok, dense_probe=uri, zero_shot_seg=uri, **kw)
    assert remote.metrics == local.metrics and remote.rows == local.rows


def test_in_loop_dense_probe_scores_the_split_the_spec_names(world, tmp_path):
    """data.dense_probe_split names the folder in-loop validation scores the probe on (fitted on
    train/ either way): with val/ (5 rows) and test/ (8 other rows) under one root, `validate`
    with split val gives exactly the numbers of a root whose test/ is a copy of that val/, and
    not the test/ numbers; the default (test) gives those. `maskclip eval` scores test/."""
    from service.evaluation import evaluate_model, validate
    from tests.service.data_fixtures import make_dense_dataset

    root = make_dense_dataset(tmp_path, rows=16, val_rows=5, test_rows=8)
    twin = tmp_path / "twin"  # the same train/, and test/ = root's val/
    shutil.copytree(root / "train", twin / "train")
    shutil.copytree(root / "val", twin / "test")
    model, tok = world["task"].student, world["tok"]

    def spec(**data):
        doc = world["spec"].model_dump(mode="json")
        doc["data"].update(dense_probe=str(root), **data)
        return build_spec(doc)

    on_val = evaluate_model(model, tok, dense_probe=str(root), dense_probe_split="val")
    assert on_val.rows == {"dense_probe_train": 16, "dense_probe_val": 5}
    copied = evaluate_model(model, tok, dense_probe=str(twin))
    assert copied.rows == {"dense_probe_train": 16, "dense_probe_test": 5}
    assert copied.metrics == on_val.metrics  # val/ really is what was scored
    on_test = evaluate_model(model, tok, dense_probe=str(root))
    assert on_test.rows == {"dense_probe_train": 16, "dense_probe_test": 8}
    assert on_test.metrics != on_val.metrics

    cpu = torch.device("cpu")
    in_loop = validate(spec(dense_probe_split="val"), model, tok, cpu)
    assert in_loop == {f"val_{k}": v for k, v in on_val.metrics.items()}
    assert set(in_loop) == {"val_dense_probe_miou", "val_dense_probe_pixel_accuracy"}
    assert spec().data.dense_probe_split == "test"
    assert validate(spec(), model, tok, cpu) == {f"val_{k}": v for k, v in on_test.metrics.items()}
    # the split the probe is fitted on cannot be the one it is scored on
    with pytest.raises(SpecError) as e:
        spec(dense_probe_split="train")
    assert e.value.lines == [
        "data.dense_probe_split: the probe is fitted on train/; score it on a held-out split "
        "(val) (got 'train')"
    ]


def test_sweep_can_rank_trials_by_dense_miou(world, dense_root):
    """sweep.metric may be a dense validation metric; without its data, or scored on the probe's
    test/ split, the sweep is refused."""
    from service.spec import SpecError
    from service.sweep_spec import validate_sweep

    base = world["spec"].model_dump(mode="json")
    base["data"]["val"] = world["test"]
    base["sweep"] = {
        "parameters": {"model.mask_ratio": {"choice": [0.5, 0.75]}},
        "metric": "val_dense_probe_miou",
    }
    with pytest.raises(SpecError) as e:
        validate_sweep(build_spec(base))
    assert (
        str(e.value)
        .strip()
        .endswith("sweep.metric: val_dense_probe_miou needs dense data; set data.dense_probe")
    )
    base["data"]["dense_probe"] = str(dense_root)
    with pytest.raises(SpecError) as e:  # the default split is test/: never tune on it
        validate_sweep(build_spec(base))
    assert (
        str(e.value)
        .strip()
        .endswith(
            "sweep.metric: val_dense_probe_miou would rank trials on data.dense_probe's test/ "
            "split; hold a split out (maskclip data convert --fashion-mnist --val-rows N writes "
            "val/) and set data.dense_probe_split: val"
        )
    )
    base["data"]["dense_probe_split"] = "val"
    assert validate_sweep(build_spec(base)).metric == "val_dense_probe_miou"
