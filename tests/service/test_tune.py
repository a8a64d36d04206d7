"""`maskclip sweep` end to end: local Ray Tune, ASHA, an MLflow server, nested trial runs."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import yaml

from service.cli import main
from tests.service.mlflow_fixture import MlflowServer

pytestmark = pytest.mark.slow

SWEPT = {"model.contrastive_weight", "model.mask_ratio"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server.uri
    server.stop()


def write_job(tmp_path: Path, train: str, uri: str, sweep: dict, name: str = "sw") -> str:
    job = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "data": {"train": train, "val": train},
        "optim": {"batch_size": 16, "max_steps": 12, "warmup_steps": 1, "log_every": 2},
        "checkpoint": {"every_steps": 4},
        "tracking": {"tracking_uri": uri, "experiment": "test-sweep"},
        "sweep": sweep,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_bad_search_space_path_is_refused_before_anything_starts(synth_parquet, tmp_path, capsys):
    sweep = {"parameters": {"model.no_such_field": {"uniform": [0.1, 0.2]}}, "metric": "loss"}
    job = write_job(tmp_path, synth_parquet, "http://127.0.0.1:9", sweep)
    assert main(["sweep", job]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: sweep.parameters.model.no_such_field: not a field of the job spec"]
    assert not (tmp_path / "runs").exists()


def test_sweep_nests_trials_stops_the_worst_with_asha_and_records_the_best(
    ray_local, synth_parquet, mlflow_server, tmp_path, capsys
):
    # Trials run one at a time, in grid order. The first (contrastive weight 0.1, low loss) sets
    # the bar at ASHA's rung 4; the next two (weights 10 and 20: ~100x the loss) fall below it
    # at their first report (step 4) and are stopped.
    sweep = {
        "parameters": {
            "model.contrastive_weight": {"grid": [0.1, 10.0, 20.0]},
            "model.mask_ratio": {"uniform": [0.5, 0.8]},
        },
        "search": "random",
        "num_samples": 1,
        "scheduler": "asha",
        "asha": {"grace_period": 2, "reduction_factor": 2, "max_t": 12},
        "metric": "loss",
        "mode": "min",
        "max_concurrent": 1,
    }
    job = write_job(tmp_path, synth_parquet, mlflow_server, sweep)
    assert main(["sweep", job]) == 0
    out = capsys.readouterr().out
    best_ckpt = next(ln for ln in out.splitlines() if ln.startswith("best checkpoint: "))
    best_ckpt = Path(best_ckpt.split(": ", 1)[1])
    assert (best_ckpt / "meta.json").is_file()

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-sweep")
    parents = client.search_runs([exp.experiment_id], "tags.`maskclip.sweep` = 'sw'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.search"] == "random"
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.params["space.model.contrastive_weight"] == "grid[0.1, 10.0, 20.0]"
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 3
    by_weight = {float(c.data.params["model.contrastive_weight"]): c for c in children}
    assert set(by_weight) == {0.1, 10.0, 20.0}

    # params differ only in the swept fields (and the trial's own run name)
    keys = set.union(*(set(c.data.params) for c in children))
    differing = {k for k in keys if len({c.data.params.get(k) for c in children}) > 1}
    assert differing <= SWEPT | {"run.name"}
    assert "model.contrastive_weight" in differing
    for c in children:
        assert c.data.params["optim.batch_size"] == "16"
        assert 0.5 <= float(c.data.params["model.mask_ratio"]) <= 0.8
        assert c.data.tags["mlflow.runName"].startswith("sw-")

    # ASHA: the low-loss trial ran to the end, at least one high-loss trial was stopped early
    good = by_weight[0.1]
    assert good.info.status == "FINISHED"
    assert good.data.tags.get("maskclip.early_stopped") is None
    assert "val_zero_shot_top1" in good.data.metrics
    stopped = [c for c in children if c.data.tags.get("maskclip.early_stopped") == "true"]
    assert stopped and good not in stopped
    for c in stopped:
        assert c.info.status == "KILLED"
        assert c.data.metrics["loss"] > good.data.metrics["loss"]
    # a stopped trial's run ends when Tune stops it, before the next trial starts, not only
    # when the sweep ends (a killed sweep would leave it RUNNING)
    starts = sorted(c.info.start_time for c in children)
    assert any(c.info.end_time < starts[-1] for c in stopped), [
        (c.info.start_time, c.info.end_time) for c in children
    ]
    # the best trial's best checkpoint model is the sweep's champion
    champion = client.get_model_version_by_alias("sw", "champion")
    assert champion.run_id == good.info.run_id
    assert parent.data.tags["maskclip.registered_model"] == "models:/sw@champion"

    # the best trial on the parent, the table and the plot as artifacts
    assert parent.data.tags["maskclip.best_trial"] == good.data.tags["mlflow.runName"]
    assert parent.data.tags["maskclip.best_mlflow_run"] == good.info.run_id
    assert Path(parent.data.tags["maskclip.best_checkpoint"]) == best_ckpt
    assert math.isclose(parent.data.metrics["best_loss"], good.data.metrics["loss"], rel_tol=1e-4)
    assert parent.data.tags["best.model.contrastive_weight"] == "0.1"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "sweep_plot.png"} <= artifacts
    csv_text = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    rows = csv_text.read_text().strip().splitlines()
    assert len(rows) == 4 and "early_stopped" in csv_text.read_text()
    assert "early_stopped" in out and "completed" in out

    # the same sweep again: the Tune experiment is restored, no trial reruns, no new runs
    assert main(["sweep", job]) == 0
    again = capsys.readouterr().out
    assert "resuming sweep sw" in again
    assert f"best checkpoint: {best_ckpt}" in again
    assert len(client.search_runs([exp.experiment_id], "tags.`maskclip.sweep` = 'sw'")) == 1
    children_again = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {c.info.run_id for c in children_again} == {c.info.run_id for c in children}


def test_the_shipped_dense_sweep_chooses_on_a_held_out_split():
    """jobs/sweep-dense.yaml (issue #13), through the real loaders (no Ray): the faithful
    MaskCLIP arm's model, ASHA on val_dense_probe_miou scored on val/ of data converted with
    --val-rows, the two swept ranges, and nothing it validates on is a test/ split."""
    from service.spec import load_spec
    from service.sweep_spec import validate_sweep

    jobs = Path(__file__).resolve().parents[2] / "jobs"
    spec = load_spec(jobs / "sweep-dense.yaml")
    sweep = validate_sweep(spec)
    assert (sweep.metric, sweep.resolved_mode, sweep.scheduler) == (
        "val_dense_probe_miou",
        "max",
        "asha",
    )
    assert {p: (d.kind, list(getattr(d, d.kind))) for p, d in sweep.parameters.items()} == {
        "model.mask_ratio": ("uniform", [0.4, 0.9]),
        "model.image_weight": ("loguniform", [0.1, 3.0]),
    }
    d = spec.data
    assert (d.dense_probe, d.dense_probe_split) == ("data/fmnist-val", "val")
    assert (d.train, d.val) == ("data/fmnist-val/train", "data/fmnist-val/val")
    assert spec.optim.val_every == 200 and spec.checkpoint.every_steps == 200
    assert spec.model == load_spec(jobs / "repro" / "maskclip.yaml").model  # the faithful arm
    assert spec.model.size == "maskclip_micro" and spec.model.mode == "faithful"
    # the command in its header makes that data
    text = (jobs / "sweep-dense.yaml").read_text()
    assert "maskclip data convert --fashion-mnist --val-rows 5000 --out data/fmnist-val" in text
