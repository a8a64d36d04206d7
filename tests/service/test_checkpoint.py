"""Checkpoint contents, exact restore, and that an interrupted write is never picked."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from maskclip import MaskCLIPTask
from maskclip.tokenizer import Tokenizer
from service import checkpoint as ckpt
from service.errors import CheckpointError
from service.spec import build_spec
from service.train_loop import build_optimizer, build_scheduler


def make(tmp_path):
    spec = build_spec({"data": {"train": str(tmp_path)}, "model": {"size": "maskclip_nano"}})
    tok = Tokenizer.train(["a red circle", "a blue square on the left"], 300, 32)
    cfg = spec.model_config_for(tok.vocab_size)
    task = MaskCLIPTask(cfg, tok.special_ids, tok.mask_id, pad_id=tok.pad_id)
    opt = build_optimizer(task, spec)
    sched = build_scheduler(opt, spec, 10)
    return spec, tok, task, opt, sched


def train_step(task, opt, sched, tok):
    images = torch.randn(4, 3, 32, 32)
    tokens = tok.encode(["a red circle"] * 4)
    loss, _ = task.training_forward(images, tokens, torch.Generator().manual_seed(0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    task.update_teacher(1, 10)


def test_save_restore_roundtrip_is_exact(tmp_path):
    spec, tok, task, opt, sched = make(tmp_path)
    train_step(task, opt, sched, tok)
    d = ckpt.save(
        tmp_path / "run" / "checkpoint_a",
        task,
        opt,
        sched,
        1,
        0,
        tok.to_json(),
        spec.to_yaml(),
        "run123",
    )
    after_save = torch.rand(3)  # RNG state was saved before this draw

    _, tok2, task2, opt2, sched2 = make(tmp_path)
    meta = ckpt.restore(d, task2, opt2, sched2)
    assert meta["step"] == 1 and meta["mlflow_run_id"] == "run123"
    for (n, a), (_, b) in zip(task.state_dict().items(), task2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for pid in s1:
        for name, value in s1[pid].items():
            assert torch.equal(value, s2[pid][name]), (pid, name)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.rand(3), after_save)  # RNG restored

    loaded, tok3, _ = ckpt.load_model(d)
    prompts = ["a photo of a circle.", "a star shape."]
    assert torch.equal(tok3.encode(prompts), tok.encode(prompts))
    assert torch.equal(
        loaded.encode_text(tok3.encode(prompts)),
        task.student.eval().encode_text(tok.encode(prompts)),
    )


def test_interrupted_write_is_never_picked(tmp_path):
    spec, tok, task, opt, sched = make(tmp_path)
    good = ckpt.save(
        tmp_path / "run" / "checkpoint_1",
        task,
        opt,
        sched,
        5,
        0,
        tok.to_json(),
        spec.to_yaml(),
        None,
    )
    # a later checkpoint whose write died before meta.json: state written, marker missing
    partial = tmp_path / "run" / "checkpoint_2"
    shutil.copytree(good, partial)
    (partial / "meta.json").unlink()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)  # truncated
    path, meta = ckpt.find_latest(str(tmp_path), "run")
    assert path.endswith("checkpoint_1") and meta["step"] == 5
    # a newer complete one wins
    ckpt.save(
        tmp_path / "run" / "checkpoint_3",
        task,
        opt,
        sched,
        9,
        0,
        tok.to_json(),
        spec.to_yaml(),
        None,
    )
    assert ckpt.find_latest(str(tmp_path), "run")[1]["step"] == 9
    assert ckpt.find_latest(str(tmp_path), "no-such-run") is None


def test_a_first_format_checkpoint_is_refused_with_one_line(tmp_path):
    """A run folder whose newest checkpoint is the old pickle format (meta.json format 1 beside
    state.pt) is refused when looked up for resume; the pickle is never opened."""
    old = tmp_path / "run" / "checkpoint_000001"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"not opened")
    (old / "meta.json").write_text('{"format": 1, "step": 3}')
    try:
        ckpt.find_latest(str(tmp_path), "run")
    except CheckpointError as e:
        message = str(e)
    else:
        raise AssertionError("an old-format checkpoint was accepted")
    assert "\n" not in message
    assert "checkpoint format 1 is not supported" in message and "pickle" in message


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _vouch(d: Path, name: str) -> None:
    """meta.json lists the planted file with its real size and hash (the writer controls both)."""
    meta = json.loads((d / "meta.json").read_text())
    data = (d / name).read_bytes()
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "meta.json").write_text(json.dumps(meta))


PLANTED = [
    "model.safetensors",
    "training.safetensors",
    "training.json",
    "tokenizer.json",
    "job.yaml",
    "state.pt",
    "student.pt",
]


@pytest.mark.parametrize("name", PLANTED)
def test_a_planted_pickle_is_never_run_by_resume_or_eval(tmp_path, synth_parquet, capsys, name):
    """A checkpoint someone else wrote, with a pickle payload under `name` (and meta.json
    vouching for it, or claiming the first format for the old pickle names): `maskclip run`
    (resume) and `maskclip eval` both refuse it with one line, exit 2, and never run it."""
    from service.cli import main

    spec, tok, task, opt, sched = make(tmp_path)
    storage = tmp_path / "ckpts"
    d = ckpt.save(
        storage / "shared" / "checkpoint_000001",
        task,
        opt,
        sched,
        1,
        0,
        tok.to_json(),
        spec.to_yaml(),
        None,
    )
    marker = tmp_path / "pwned"
    (d / name).write_bytes(pickle.dumps(_Payload(marker)))
    if name in ("state.pt", "student.pt"):
        (d / "meta.json").write_text(json.dumps({"format": 1, "step": 1}))
    else:
        _vouch(d, name)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "shared", "output_dir": str(tmp_path / "runs")},
                "model": {"size": "maskclip_nano", "vocab_size": 300},
                "data": {"train": synth_parquet},
                "checkpoint": {"storage_path": str(storage)},
                "tracking": {"enabled": False},
            }
        )
    )
    evaluate = ["eval", str(d), "--retrieval", synth_parquet, "--no-mlflow"]
    if name == "job.yaml":
        # job.yaml is read by eval only (yaml.safe_load, for the run's name) and is not needed
        # to load the model: the evaluation goes on with one warning
        assert main(evaluate) == 0
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("warning: "), err
    else:
        for argv in (["run", str(job)], evaluate):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert len(err) == 1 and err[0].startswith("error: ") and str(d) in err[0], (argv, err)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, capsys, request, where, damage
):
    """Ray copies a checkpoint folder to storage with concurrent uploads, so a crash can leave
    meta.json beside a partial weights file: resume then takes the previous checkpoint, with
    one warning line naming the torn one."""
    import pyarrow.fs as pafs

    from service.storage import s3_filesystem

    spec, tok, task, opt, sched = make(tmp_path)
    local = tmp_path / "storage"
    for step in (2, 4):
        ckpt.save(
            local / "run" / f"checkpoint_{step:06d}",
            task,
            opt,
            sched,
            step,
            0,
            tok.to_json(),
            spec.to_yaml(),
            None,
        )
    newest = local / "run" / "checkpoint_000004" / "model.safetensors"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    else:
        newest.unlink()
    fs, root = None, str(local)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        fs = s3_filesystem(endpoint_url=request.getfixturevalue("s3_server"))
        pafs.copy_files(
            str(local),
            f"{bucket}/ckpts",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
        root = f"{bucket}/ckpts"
    capsys.readouterr()
    path, meta = ckpt.find_latest(root, "run", fs)
    assert meta["step"] == 2 and path.endswith("checkpoint_000002")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    what = "does not match meta.json" if damage == "truncate" else "is missing"
    assert len(err) == 1 and err[0].startswith("warning: skipping a torn checkpoint: ")
    assert f"checkpoint_000004: incomplete checkpoint: model.safetensors {what}" in err[0]
