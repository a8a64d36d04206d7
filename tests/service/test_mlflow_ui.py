"""The MLflow UI, the product's comparison surface, checked in a real browser.

A real MLflow server holds two finished runs (CLIP vs MaskCLIP) and a small sweep (a parent run
with nested trials, one stopped early), made with the same `service.tracking.start_run` that
training uses. Headless Chromium (Debian's `chromium`) opens the run-compare page and the test
reads the rendered DOM: both runs' swept params and final metrics must be on the page. The
screenshot is kept under `.pytest-artifacts/` (gitignored). Where chromium is missing the test
is skipped, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric

from service.tracking import start_run
from tests.service.mlflow_fixture import MlflowServer

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".pytest-artifacts"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed (CI installs Debian's chromium in .ci/run)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


def _browse(exe: str, url: str, *extra: str, timeout: float = 120) -> str:
    cmd = [
        exe,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1600,1400",
        "--virtual-time-budget=20000",
        *extra,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _text(dom: str) -> str:
    """The page's visible text, whitespace collapsed."""
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom)).replace("\xa0", " ")
    return re.sub(r"\s+", " ", text)


def _finished_run(client, uri, experiment, name, params, metrics, parent=None, tags=None):
    run_id = start_run(uri, experiment, name, params, tags or {}, parent_run_id=parent)
    assert run_id is not None
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 100) for k, v in metrics.items()])
    client.set_terminated(run_id, "FINISHED" if not (tags or {}) else "KILLED")
    return run_id


def test_compare_page_shows_both_runs_params_and_metrics(tmp_path):
    exe = _chromium()
    server = MlflowServer(tmp_path).start()
    try:
        uri, client = server.uri, mlflow.MlflowClient(server.uri)
        clip = _finished_run(
            client,
            uri,
            "compare",
            "clip-s0",
            {"model.mask_ratio": "0.0", "optim.lr": "0.0005", "model.size": "maskclip_nano"},
            {"val_zero_shot_top1": 0.432, "val_image_to_text_R1": 0.211, "loss": 1.875},
        )
        maskclip = _finished_run(
            client,
            uri,
            "compare",
            "maskclip-s0",
            {"model.mask_ratio": "0.75", "optim.lr": "0.0005", "model.size": "maskclip_nano"},
            {"val_zero_shot_top1": 0.568, "val_image_to_text_R1": 0.314, "loss": 1.625},
        )
        # a small sweep: parent + nested trials, one stopped early by ASHA
        parent = start_run(uri, "compare", "lr-sweep", {"space.optim.lr": "loguniform"}, {})
        trials = [
            _finished_run(
                client,
                uri,
                "compare",
                f"lr-sweep-t{i}",
                {"optim.lr": lr},
                {"val_zero_shot_top1": top1},
                parent=parent,
                tags={"maskclip.early_stopped": "true"} if i == 1 else None,
            )
            for i, (lr, top1) in enumerate((("0.001", 0.61), ("0.01", 0.22)))
        ]
        client.set_terminated(parent, "FINISHED")
        assert client.get_run(trials[1]).data.tags["maskclip.early_stopped"] == "true"
        exp_id = client.get_experiment_by_name("compare").experiment_id
        # every run carries its source tags (the UI's "Source" and "User" columns)
        tags = client.get_run(clip).data.tags
        assert tags["mlflow.source.name"] and tags["mlflow.user"]
        assert len(tags.get("mlflow.source.git.commit", "")) == 40

        query = urllib.parse.urlencode(
            {"runs": json.dumps([clip, maskclip]), "experiments": json.dumps([exp_id])}
        )
        url = f"{uri}/#/compare-runs?{query}"
        dom = _browse(exe, url, "--dump-dom")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "mlflow-compare-runs.html").write_text(dom, encoding="utf-8")
        text = _text(dom)
        # the page's tables: run names, then params and metrics, one column per run (the UI
        # shows metrics to 3 significant digits)
        assert "Run Name: clip-s0 maskclip-s0" in text, text[:3000]
        params = text[text.index("Parameters Show diff only") :]
        assert "model.mask_ratio 0.0 0.75" in params and "optim.lr 0.0005 0.0005" in params
        metrics = text[text.index("Metrics Show diff only") :]
        assert metrics.startswith(
            "Metrics Show diff only loss val_image_to_text_R1 val_zero_shot_top1 "
            "1.875 1.625 0.211 0.314 0.432 0.568"
        ), metrics[:300]

        shot = tmp_path / "compare-runs.png"
        _browse(exe, url, f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
        shutil.copy(shot, ARTIFACTS / "mlflow-compare-runs.png")

        # the sweep: the parent's nested trials side by side on the same page
        query = urllib.parse.urlencode(
            {"runs": json.dumps(trials), "experiments": json.dumps([exp_id])}
        )
        text = _text(_browse(exe, f"{uri}/#/compare-runs?{query}", "--dump-dom"))
        assert "Run Name: lr-sweep-t0 lr-sweep-t1" in text, text[:3000]
        assert "optim.lr 0.001 0.01" in text[text.index("Parameters Show diff only") :]
        metrics = text[text.index("Metrics Show diff only") :]
        assert metrics.startswith("Metrics Show diff only val_zero_shot_top1 0.61 0.22"), metrics
    finally:
        server.stop()
