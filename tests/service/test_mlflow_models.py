"""Checkpoints as MLflow models: logged, linked to metrics, registered, opened in one call."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from maskclip import MaskCLIPTask
from maskclip.checkpoint import load as load_checkpoint
from maskclip.tokenizer import Tokenizer
from service import checkpoint as ckpt
from service.errors import UserError
from service.evaluation import _resolve
from service.spec import build_spec
from service.tracking import log_checkpoint_model, register_best, start_run


def _model_folder(tmp_path, step: int, seed: int):
    torch.manual_seed(seed)
    spec = build_spec({"data": {"train": str(tmp_path)}, "model": {"size": "maskclip_nano"}})
    tok = Tokenizer.train(["a red circle", "a blue square on the left"], 300, 32)
    task = MaskCLIPTask(
        spec.model_config_for(tok.vocab_size), tok.special_ids, tok.mask_id, pad_id=tok.pad_id
    )
    d = tmp_path / f"model-{step}"
    ckpt.save(d, task, None, None, step, 0, tok.to_json(), "run: {}\n", None, training_state=False)
    return d, task, tok


def test_checkpoints_are_logged_models_and_the_best_is_the_champion(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    run_id = start_run(uri, "models", "job", {"model.size": "maskclip_nano"}, {})
    ids = {}
    for step, loss, seed in ((2, 3.0, 0), (4, 1.5, 1), (6, 2.0, 2)):
        folder, task, tok = _model_folder(tmp_path, step, seed)
        ids[step] = log_checkpoint_model(uri, run_id, str(folder), step, {"loss": loss})
        assert ids[step] is not None
    client = mlflow.MlflowClient(uri)

    # each checkpoint is a READY LoggedModel, an output of the run at its step, loss linked
    run = client.get_run(run_id)
    assert sorted((o.model_id, o.step) for o in run.outputs.model_outputs) == sorted(
        (mid, step) for step, mid in ids.items()
    )
    linked = client.get_logged_model(ids[4])
    assert str(linked.status) == "READY" and linked.source_run_id == run_id
    assert [(m.key, m.value, m.step) for m in linked.metrics] == [("loss", 1.5, 4)]

    # the lowest loss is registered as job@champion
    assert register_best(uri, [run_id], "job", "loss", "min") == "job@champion"
    version = client.get_model_version_by_alias("job", "champion")
    assert version.source == f"models:/{ids[4]}"

    # one call opens it: the pyfunc around the safetensors folder (nothing pickled)
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/job@champion")
    wrapped = pyfunc.unwrap_python_model()
    folder, task, tok = _model_folder(tmp_path, 4, 1)
    for name, tensor in task.student.state_dict().items():
        assert torch.equal(wrapped.model.state_dict()[name], tensor), name
    emb = pyfunc.predict(pd.DataFrame({"caption": ["a red circle", "a blue square"]}))
    assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    stored = mlflow.artifacts.download_artifacts(f"models:/{ids[4]}", dst_path=str(tmp_path / "dl"))
    assert not list((tmp_path / "dl").rglob("*.pkl")), "nothing pickled"
    model, _, meta = load_checkpoint(f"{stored}/artifacts/checkpoint")  # the library's loader
    assert meta["step"] == 4

    # maskclip eval models:/name@alias
    resolved = _resolve("models:/job@champion", tracking_uri=uri)
    assert resolved.kind == "model" and resolved.mlflow_run_id == run_id
    assert load_checkpoint(resolved.path)[2]["step"] == 4
    with pytest.raises(UserError, match=r"^models:/job@nobody: no such registered model"):
        _resolve("models:/job@nobody", tracking_uri=uri)


@pytest.mark.slow
def test_a_real_run_holds_lineage_a_loadable_model_and_a_champion(
    ray_local, synth_parquet, tmp_path
):
    """One short `maskclip run` (4 steps, a checkpoint at 2): its MLflow run holds a logged
    model per checkpoint that loads in one call, the datasets as inputs with a digest, system
    metrics, source tags, and its best checkpoint registered as <run name>@champion."""
    import yaml

    from service.cli import main
    from tests.service.mlflow_fixture import MlflowServer

    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        job = {
            "run": {"name": "lineage", "output_dir": str(tmp_path / "runs")},
            "data": {"train": synth_parquet, "val": synth_parquet},
            "model": {"size": "maskclip_nano", "vocab_size": 300},
            "optim": {"batch_size": 16, "max_steps": 4, "warmup_steps": 1, "log_every": 2},
            "checkpoint": {"every_steps": 2},
            "tracking": {"tracking_uri": server.uri, "experiment": "lineage"},
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        assert main(["run", str(tmp_path / "job.yaml")]) == 0
        client = mlflow.MlflowClient(server.uri)
        exp = client.get_experiment_by_name("lineage")
        (run,) = client.search_runs([exp.experiment_id])

        # a LoggedModel per checkpoint, at its step; the final one carries the val metrics
        outputs = {o.step: o.model_id for o in run.outputs.model_outputs}
        assert sorted(outputs) == [2, 4]
        final = client.get_logged_model(outputs[4])
        assert {"loss", "val_zero_shot_top1", "val_image_to_text_R1"} <= {
            m.key for m in final.metrics
        }
        mlflow.set_tracking_uri(server.uri)
        model = mlflow.pyfunc.load_model(f"models:/{outputs[4]}")  # one call
        assert model.unwrap_python_model().meta["step"] == 4
        champion = client.get_model_version_by_alias("lineage", "champion")
        assert champion.source in {f"models:/{outputs[2]}", f"models:/{outputs[4]}"}

        # datasets as inputs: name, source, digest
        inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val"}
        assert len(inputs["train"].digest) == 16 and synth_parquet in inputs["train"].source

        # system metrics and source tags
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(
            run.data.metrics
        )
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    finally:
        server.stop()
