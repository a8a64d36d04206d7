"""The library's checkpoint format: exact round trip, and nothing in a folder is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from maskclip import MaskCLIPTask, get_config
from maskclip import checkpoint as fmt
from maskclip.tokenizer import Tokenizer


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _task_and_tokenizer():
    tok = Tokenizer.train(["a red circle", "a blue square on the left"], 300, 16)
    cfg = get_config("maskclip_nano", text={"vocab_size": tok.vocab_size, "context_length": 16})
    task = MaskCLIPTask(cfg, tok.special_ids, tok.mask_id, pad_id=tok.pad_id)
    return task, tok


def _saved(tmp_path: Path) -> tuple[Path, MaskCLIPTask, Tokenizer]:
    task, tok = _task_and_tokenizer()
    opt = torch.optim.AdamW(task.student.parameters())
    d = fmt.save(tmp_path / "ckpt", task, tok.to_json(), step=3, optimizer=opt)
    return d, task, tok


def test_load_rebuilds_the_model_from_the_folder_alone(tmp_path):
    d, task, tok = _saved(tmp_path)
    model, tok2, meta = fmt.load(d)
    tokens = tok.encode(["a red circle"])
    assert meta["step"] == 3 and not model.training
    assert torch.equal(
        model.encode_text(tok2.encode(["a red circle"])), task.student.eval().encode_text(tokens)
    )
    names = {p.name for p in d.iterdir()}
    assert names == {
        "model.safetensors",
        "tokenizer.json",
        "training.safetensors",
        "training.json",
        "meta.json",
    }


def _rehash(d: Path, name: str) -> None:
    """Update meta.json so that it vouches for the planted file (an attacker controls it too)."""
    meta = json.loads((d / "meta.json").read_text())
    data = (d / name).read_bytes()
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "training.safetensors",
        "training.json",
        "tokenizer.json",
        "meta.json",
        "state.pt",
        "student.pt",
    ],
)
def test_a_pickle_planted_under_any_name_is_never_executed(tmp_path, name):
    d, task, _ = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (d / name).write_bytes(pickle.dumps(_Payload(marker)))
    if name in ("state.pt", "student.pt"):  # the first format: meta.json says format 1
        (d / "meta.json").write_text(json.dumps({"format": 1, "step": 3}))
    elif name != "meta.json":
        _rehash(d, name)
    fresh, _ = _task_and_tokenizer()
    attempts = [lambda: fmt.load(d), lambda: fmt.check(d)]  # both check every file
    if name != "tokenizer.json":  # restore reads meta, the weights and the training state
        attempts.append(lambda: fmt.restore(d, fresh))
    for attempt in attempts:
        with pytest.raises(fmt.FormatError) as info:
            attempt()
        assert "\n" not in str(info.value) and str(d) in str(info.value)
    assert not marker.exists()


def test_a_file_that_does_not_match_meta_is_an_incomplete_checkpoint(tmp_path):
    d, _, _ = _saved(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(fmt.FormatError, match="incomplete checkpoint: model.safetensors does not"):
        fmt.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(
        fmt.FormatError, match="incomplete checkpoint: model.safetensors is missing"
    ):
        fmt.load(d)
