"""A worker's node is told it will go away (a spot reclaim, a drained Kubernetes node), as the
rendered worker pod tells it: its preStop hook, `maskclip node-preempt`, drains the Ray node with
reason PREEMPTION and a deadline. The run checkpoints at its next step, the hook returns once
that checkpoint is on storage, the node is then removed, and the run finishes from that
checkpoint on the node left (elastic: `scaling.min_workers: 1`).

A real multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`, as in test_node_loss):
a head and two worker nodes, one training worker per node. `checkpoint.every_steps` is larger
than the run, so the only checkpoint before the end is the one the notice asked for.
The script runs in its own process: the suite's other tests share one local Ray instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    r"""
    import json, os, subprocess, sys, threading, time
    from pathlib import Path

    import mlflow
    import yaml
    from ray.cluster_utils import Cluster

    from service.k8s import render_rayjob, termination_grace_s
    from service.spec import build_spec

    work, data = Path(sys.argv[1]), sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # 1.5 CPUs per training worker keeps one worker per node, 0.5 CPU per node for Ray Data
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    tracking = f"sqlite:///{work}/mlflow.db"
    job = {
        "run": {"name": "preempted", "output_dir": str(work / "runs")},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "data": {"train": data},
        "optim": {"batch_size": 8, "max_steps": 30, "warmup_steps": 1, "log_every": 1},
        "scaling": {"num_workers": 2, "min_workers": 1, "cpus_per_worker": 1.5,
                    "data_cpus_per_worker": 0.5, "ray_address": cluster.address},
        "checkpoint": {"every_steps": 1000, "max_failures": 4},
        "tracking": {"tracking_uri": tracking, "experiment": "preempted"},
        "cluster": {"stop_grace_s": 60},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    spec = build_spec(job)
    rayjob = render_rayjob(spec, spec.to_yaml(), image="ghcr.io/maskclip/maskclip-service:0.1.0")
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    storage = work / "runs" / "checkpoints" / "preempted"
    out = {"grace_s": pod["terminationGracePeriodSeconds"], "hook": hook}

    def logged_steps():
        client = mlflow.MlflowClient(tracking)
        exp = client.get_experiment_by_name("preempted")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if not runs:
            return []
        return [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]

    def checkpoints():
        found = []
        for meta in storage.glob("checkpoint_*/meta.json"):
            try:
                found.append(json.loads(meta.read_text())["step"])
            except (OSError, ValueError):
                pass
        return sorted(found)

    def preempt():
        deadline = time.time() + 600
        while time.time() < deadline and max(logged_steps(), default=0) < 6:
            time.sleep(0.5)
        out["notice_step"] = max(logged_steps(), default=0)
        out["notice_at"] = time.time()
        # the pod's preStop hook, as rendered (the console script `maskclip`), on node 2;
        # KubeRay gives the pod RAY_ADDRESS, a pod has one Ray node (here: --node-id)
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        proc = subprocess.run(
            [str(Path(sys.executable).parent / hook[0]), *hook[1:], "--node-id", nodes[1].node_id],
            capture_output=True, text=True, env=env, timeout=300,
        )
        out["hook_at"] = time.time()
        out["hook_rc"], out["hook_out"] = proc.returncode, proc.stdout + proc.stderr
        out["checkpoints_at_hook"] = checkpoints()
        out["steps_at_removal"] = max(logged_steps(), default=0)
        cluster.remove_node(nodes[1])  # the kubelet's SIGTERM after the hook: Ray stops
        out["removed_at"] = time.time()

    threading.Thread(target=preempt, daemon=True).start()
    from service.cli import main

    rc = main(["run", str(work / "job.yaml")])
    print("RESULT " + json.dumps({"rc": rc, "tracking": tracking, **out}), flush=True)
    import ray

    ray.shutdown()
    cluster.shutdown()
    """
)


def test_a_preempted_node_checkpoints_before_it_goes_and_the_run_continues_from_there(
    tmp_path, synth_parquet
):
    import re

    import mlflow

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), synth_parquet],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=os.getcwd(),
    )
    output = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, output[-4000:]
    r = json.loads(lines[-1][len("RESULT ") :])
    assert r["rc"] == 0, output[-4000:]
    assert "removed_at" in r, "the node was never removed"

    # the rendered worker pod: the hook, and a grace period longer than the hook may wait
    assert r["hook"] == ["maskclip", "node-preempt", "--within", "60"]
    assert r["grace_s"] == 90

    # the hook returned once the run had checkpointed, at (about) the step of the notice
    assert r["hook_rc"] == 0, r["hook_out"]
    found = re.search(
        r"the run checkpointed at step (\d+) ([\d.]+) s after the notice", r["hook_out"]
    )
    assert found, r["hook_out"]
    step, notice_to_checkpoint = int(found.group(1)), float(found.group(2))
    # MLflow's history trails the workers by a step or two (logging is asynchronous)
    assert r["notice_step"] <= step <= r["notice_step"] + 8, (r["notice_step"], step)
    assert r["checkpoints_at_hook"] == [step], r["checkpoints_at_hook"]  # on storage, before
    assert notice_to_checkpoint < r["grace_s"]  # the rendered grace period covers it
    assert f"preemption notice: checkpoint saved at step {step}" in proc.stdout, output[-4000:]
    # the restarted group resumed from that checkpoint (the only one before the end)
    assert f"a worker restart resumed from the checkpoint at step {step}" in proc.stdout, output[
        -4000:
    ]

    client = mlflow.MlflowClient(r["tracking"])
    (run,) = client.search_runs([client.get_experiment_by_name("preempted").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))  # continuous, none twice

    after = sorted((m.timestamp / 1000, m.step) for m in history if m.step > step)
    before = sorted(m.timestamp / 1000 for m in history if m.step <= r["notice_step"])
    step_s = (before[-1] - before[0]) / max(1, len(before) - 1)
    first_new = next(t for t, s in after if t > r["removed_at"])
    redone = max(0, r["steps_at_removal"] - step)
    resumed_s = first_new - r["removed_at"]
    print(
        f"preemption: notice at step {r['notice_step']}, checkpoint at step {step} "
        f"{notice_to_checkpoint:.1f} s after the notice (rendered grace {r['grace_s']} s); "
        f"the hook returned {r['hook_at'] - r['notice_at']:.1f} s after the notice; first new "
        f"step {resumed_s:.1f} s after the node went; {redone} step(s) redone "
        f"({step_s:.2f} s/step): time lost ~{resumed_s + redone * step_s:.1f} s"
    )
    assert resumed_s < 300
    # a restart sized on a stale view gives up after ELASTIC_START_TIMEOUT_S, not Ray's 60 s
    assert (
        "timed out after 60.0 seconds"
        not in (tmp_path / "runs" / "preempted" / "ray.log").read_text()
    )
