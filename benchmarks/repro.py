"""CLIP vs MaskCLIP (faithful, efficient) on Fashion-MNIST: train, evaluate, write docs/results.md.

    python benchmarks/repro.py                                   # 3 arms x 3 seeds (hours on CPU)
    python benchmarks/repro.py --steps 5 --seeds 1 --rows 200 \\
        --work /tmp/repro --out /tmp/repro/results.md            # a minute-scale smoke run

For each arm (jobs/repro/<arm>.yaml) and seed S it runs
    maskclip run jobs/repro/<arm>.yaml --set run.seed=S --set run.name=<arm>-s<S> ...
then
    maskclip eval <work>/checkpoints/<arm>-s<S> --zero-shot DATA/test --retrieval DATA/test
                  --linear-probe DATA --json ...
and collects the metrics plus the training step time (from the run's MLflow `samples_per_s`,
else the wall time of `maskclip run` over its steps). The report has mean ± std per arm, the
commands, the hardware, and a computed reading: for each metric, whether each arm's difference
from CLIP exceeds the seed-to-seed spread (|Δmean| > max std of the two arms).

Finished runs are reused (the same name resumes in Ray's storage), so an interrupted study can be
re-run with the same arguments. Nothing here is run by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTED = datetime.now(timezone.utc)
ARMS = ("clip", "maskclip", "maskclip-efficient")
BASELINE = "clip"
METRICS = (
    ("zero_shot_top1", "zero-shot top-1"),
    ("zero_shot_top5", "zero-shot top-5"),
    ("linear_probe_top1", "linear-probe top-1"),
    ("image_to_text_R1", "img→text R@1"),
    ("image_to_text_R10", "img→text R@10"),
    ("text_to_image_R1", "text→img R@1"),
    ("text_to_image_R10", "text→img R@10"),
    ("dense_probe_miou", "dense-probe mIoU"),
    ("dense_probe_pixel_accuracy", "dense-probe pixel acc"),
    ("zero_shot_seg_miou", "zero-shot seg mIoU"),
    ("zero_shot_seg_pixel_accuracy", "zero-shot seg pixel acc"),
    ("step_time_s", "step time (s)"),
    ("final_loss_contrastive", "final contrastive loss"),
    ("final_logit_scale", "final logit scale"),
    ("run_minutes", "training run wall time (min)"),
)


DENSE = (
    "dense_probe_miou",
    "dense_probe_pixel_accuracy",
    "zero_shot_seg_miou",
    "zero_shot_seg_pixel_accuracy",
)
"""Metrics measured on each dense set (--dense); the first set's are the main table's."""
BASELINES = {"random": "random init", "pixels": "raw patch pixels"}
"""maskclip eval --dense-baseline NAME: the dense probe on an untrained model of the same
config, and on each patch's raw pixels; run beside every CLIP seed so a trained model's dense
number is read against what no training (and no model) gives."""


def maskclip_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "maskclip"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


def show(cmd: list[str]) -> str:
    """A command as the user would type it (`maskclip ...`)."""
    words = (
        ["maskclip", *cmd[len(maskclip_cmd()) :]]
        if cmd[: len(maskclip_cmd())] == maskclip_cmd()
        else cmd
    )
    return shlex.join(words)


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {show(cmd)}   (log: {log})", flush=True)
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t
    print(f"  -> exit {rc} in {wall:.0f}s", flush=True)
    return rc, wall


def ensure_data(args, work: Path) -> Path:
    """The Fashion-MNIST root (train/ + test/): --data, or a --rows-limited copy under work."""
    if args.rows:
        root = work / f"fmnist-{args.rows}"
    else:
        root = Path(args.data)
    if all((root / s / "_SUCCESS").is_file() for s in ("train", "test")):
        return root.resolve()
    cmd = [
        *maskclip_cmd(),
        "data",
        "convert",
        "--fashion-mnist",
        "--out",
        str(root),
        "--overwrite",
        "--no-progress",
    ]
    if args.rows:
        cmd += ["--limit", str(args.rows)]
    rc, _ = run(cmd, work / "logs" / "data.log")
    if rc != 0:
        sys.exit(f"data conversion failed; see {work / 'logs' / 'data.log'}")
    return root.resolve()


def dense_tag(j: int, root: str) -> str:
    """Metric prefix of dense set j: none for the first (the main table), its name after."""
    return "" if j == 0 else f"{Path(root).name}:"


def dense_cmd(args, work: Path, name: str, run_dir: Path, uri: str, arm: str, j: int):
    root = args.dense[j]
    cmd = [
        *maskclip_cmd(),
        "eval",
        str(run_dir),
        "--dense-probe",
        root,
        "--zero-shot-seg",
        root,
        "--max-rows",
        str(args.dense_rows),
        "--json",
        str(work / "eval" / f"{name}.dense{j}.json"),
        "--tracking-uri",
        uri,
    ]
    if arm == BASELINE:
        for b in BASELINES:
            cmd += ["--dense-baseline", b]
    return cmd


def dense_eval(args, work, name, run_dir, steps, uri, arm, seed) -> tuple[dict, int]:
    """Every --dense set on this run's final checkpoint (reused when current) -> metrics
    (prefixed per dense_tag; baselines as `<tag>baseline_<name>_<metric>`), exit code."""
    out: dict[str, float] = {}
    for j, root in enumerate(args.dense or []):
        out_json = work / "eval" / f"{name}.dense{j}.json"
        if not eval_is_current(out_json, run_dir, steps):
            rc, _ = run(
                dense_cmd(args, work, name, run_dir, uri, arm, j),
                work / "logs" / f"{name}.dense{j}.log",
            )
            if rc != 0:
                return out, rc
        m = json.loads(out_json.read_text())["metrics"]
        tag = dense_tag(j, root)
        for key in DENSE:
            if key in m:
                out[tag + key] = m[key]
            for b in BASELINES:
                bkey = key.replace("dense_probe_", f"dense_probe_{b}_")
                if bkey != key and bkey in m:
                    out[f"{tag}baseline_{b}_{key}"] = m[bkey]
    return out, 0


def read_final_step(run_dir: Path) -> int | None:
    steps = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            steps.append(json.loads(meta.read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass
    return max(steps) if steps else None


def eval_is_current(out_json: Path, run_dir: Path, steps: int) -> bool:
    """An eval JSON of this run's final checkpoint (step == steps) exists."""
    try:
        res = json.loads(out_json.read_text())
        return res["checkpoint"]["step"] == steps and Path(
            res["checkpoint"]["path"]
        ).is_relative_to(run_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def training_end(uri: str, run_id: str | None, last: int = 5) -> dict[str, float]:
    """Mean of the last `last` logged values of the contrastive loss and the logit scale."""
    if not run_id:
        return {}
    out = {}
    try:
        import mlflow

        client = mlflow.MlflowClient(uri)
        info = client.get_run(run_id).info
        if info.end_time and info.start_time:
            out["run_minutes"] = (info.end_time - info.start_time) / 60000
        for key in ("loss_contrastive", "logit_scale"):
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if hist:
                out[f"final_{key}"] = statistics.fmean(m.value for m in hist[-last:])
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}
    return out


def step_time(uri: str, run_id: str | None, batch: int) -> float | None:
    """Median seconds per step from the run's logged samples_per_s (first point dropped: it
    includes start-up), or None."""
    if not run_id:
        return None
    try:
        import mlflow

        hist = mlflow.MlflowClient(uri).get_metric_history(run_id, "samples_per_s")
    except Exception:  # noqa: BLE001 - fall back to wall time
        return None
    values = [m.value for m in sorted(hist, key=lambda m: m.step) if m.value > 0]
    values = values[1:] or values
    return batch / statistics.median(values) if values else None


def local_experiments(uri: str, work: Path, arms: list[str]) -> None:
    """Create the arms' experiments with artifacts under `work` (a sqlite store would otherwise
    put them in ./mlruns of the current folder)."""
    from service.spec import load_spec

    try:
        import mlflow

        client = mlflow.MlflowClient(uri)
        for arm in arms:
            name = load_spec(ROOT / "jobs" / "repro" / f"{arm}.yaml").tracking.experiment
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=str(work / "mlartifacts" / name))
    except Exception as e:  # noqa: BLE001 - tracking is optional: training warns on its own
        print(f"warning: cannot prepare MLflow experiments at {uri}: {e}", file=sys.stderr)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float, std: float | None, digits: int = 3) -> str:
    if mean != mean:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def hardware() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{model}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}"
    try:
        import torch

        text += f"; torch {torch.__version__}, {torch.get_num_threads()} threads"
        if torch.cuda.is_available():
            text += f"; GPU {torch.cuda.get_device_name(0)} (training used scaling.use_gpu=false)"
    except ImportError:
        pass
    return text


def caption_note(test_dir: Path) -> str:
    try:
        import pyarrow.dataset as ds

        table = ds.dataset(str(test_dir), format="parquet").to_table(columns=["caption"])
        caps = table.column("caption").to_pylist()
    except Exception:  # noqa: BLE001
        return ""
    distinct = len(set(caps))
    if distinct >= len(caps):
        return ""
    return (
        f"Retrieval on template captions: the {len(caps)} test captions hold only {distinct} "
        "distinct strings (template × class). `retrieval_recall` gets the caption ids, so "
        "identical captions are one candidate (image→text ranks the distinct captions; "
        "text→image hits on any image carrying the caption). An image cannot show which "
        "template its caption used, so image→text R@1 stays near 1/(templates per class) "
        "even for a perfect model and R@10 mostly measures the class; read zero-shot and "
        "linear probe first."
    )


def reading(arms: list[str], summary: dict) -> list[str]:
    lines = []
    others = [a for a in arms if a != BASELINE]
    if BASELINE not in arms or not others:
        return ["(no reading: the CLIP arm and at least one other arm are needed)"]
    for key, label in METRICS:
        if key.startswith("final_") or key == "run_minutes":
            continue  # diagnostics, not outcomes
        base = summary[BASELINE].get(key)
        if not base or base[0] != base[0]:
            continue
        parts = []
        for arm in others:
            m = summary[arm].get(key)
            if not m or m[0] != m[0]:
                continue
            delta = m[0] - base[0]
            stds = [s for s in (m[1], base[1]) if s is not None]
            if len(stds) < 2:
                verdict = "no spread known (needs ≥ 2 seeds per arm): cannot tell"
            elif abs(delta) > max(stds):
                verdict = f"exceeds the seed spread ({max(stds):.3f})"
            else:
                verdict = f"within the seed spread ({max(stds):.3f})"
            parts.append(f"{arm} {delta:+.3f} — {verdict}")
        if parts:
            lines.append(f"- **{label}** (Δ vs CLIP): " + "; ".join(parts))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    p.add_argument("--steps", type=int, default=None, help="override optim.max_steps")
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="use only the first N Fashion-MNIST rows per split (smoke runs)",
    )
    p.add_argument("--data", default="data/fmnist", help="Fashion-MNIST root (train/, test/)")
    p.add_argument("--work", default="runs/repro", help="run folders, checkpoints, MLflow, logs")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--eval-max-rows", type=int, default=None, help="maskclip eval --max-rows")
    p.add_argument(
        "--probe-rows",
        type=int,
        default=10000,
        help="maskclip eval --probe-rows: train rows for the linear probe (all 60k take ~6x "
        "longer to encode on CPU)",
    )
    p.add_argument(
        "--dense",
        nargs="*",
        default=None,
        help="dense-labelled roots (train/ + test/ with a mask column and classes.txt) for the "
        "dense probe and zero-shot segmentation; the first is the main table's (default: the "
        "data root, whose Fashion-MNIST conversion carries masks); none: skip",
    )
    p.add_argument(
        "--dense-rows", type=int, default=2000, help="rows per split for the dense evaluation"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished runs (evaluating any not yet evaluated)",
    )
    args = p.parse_args()

    from service.spec import load_spec

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args, work)
    if args.dense is None:
        args.dense = [str(data)] if (data / "test" / "classes.txt").is_file() else []
        if not args.dense:
            print(f"note: {data} has no masks (converted before they existed): no dense columns")
    args.dense = [str(Path(d).resolve()) for d in args.dense]
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"
    if uri.startswith("sqlite:"):
        local_experiments(uri, work, args.arms)
    started = STARTED
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    failures: list[str] = []
    commands: list[str] = []

    # Seed-major order: an interrupted study still has every arm at the seeds it finished.
    for seed in range(args.seeds):
        for arm in args.arms:
            job = ROOT / "jobs" / "repro" / f"{arm}.yaml"
            name = f"{arm}-s{seed}"
            sets = [
                f"run.seed={seed}",
                f"run.name={name}",
                f"run.output_dir={work}",
                f"tracking.tracking_uri={uri}",
            ]
            if args.steps:
                sets += [
                    f"optim.max_steps={args.steps}",
                    f"optim.warmup_steps={min(100, max(1, args.steps // 2))}",
                    f"checkpoint.every_steps={max(1, min(100, args.steps))}",
                ]
            if args.rows or Path(args.data).resolve() != (ROOT / "data" / "fmnist").resolve():
                sets += [f"data.train={data / 'train'}", f"data.val={data / 'test'}"]
            spec = load_spec(job, sets)
            cmd = [*maskclip_cmd(), "run", str(job.relative_to(ROOT))]
            for s in sets:
                cmd += ["--set", s]
            run_dir = work / "checkpoints" / name
            steps = spec.optim.max_steps
            wall = None
            if read_final_step(run_dir) == steps:
                print(f"{name}: finished run found in {run_dir}; reusing it", flush=True)
            elif args.report_only:
                failures.append(f"{name}: not run (--report-only and no finished run)")
                continue
            else:
                rc, wall = run(cmd, work / "logs" / f"{name}.train.log")
                if rc != 0:
                    failures.append(
                        f"{name}: maskclip run exited {rc} (log {work}/logs/{name}.train.log)"
                    )
                    continue
            out_json = work / "eval" / f"{name}.json"
            out_json.parent.mkdir(parents=True, exist_ok=True)
            ecmd = [
                *maskclip_cmd(),
                "eval",
                str(run_dir),
                "--zero-shot",
                str(data / "test"),
                "--retrieval",
                str(data / "test"),
                "--linear-probe",
                str(data),
                "--json",
                str(out_json),
                "--tracking-uri",
                uri,
            ]
            if args.eval_max_rows:
                ecmd += ["--max-rows", str(args.eval_max_rows)]
            if args.probe_rows:
                ecmd += ["--probe-rows", str(args.probe_rows)]
            if seed == 0:
                commands += [show(cmd), show(ecmd)]
            if wall is None and eval_is_current(out_json, run_dir, steps):
                print(f"{name}: evaluation of the final checkpoint found; reusing it", flush=True)
                rc = 0
            else:
                rc, _ = run(ecmd, work / "logs" / f"{name}.eval.log")
            if rc != 0:
                failures.append(
                    f"{name}: maskclip eval exited {rc} (log {work}/logs/{name}.eval.log)"
                )
                continue
            res = json.loads(out_json.read_text())
            dense_metrics, drc = dense_eval(args, work, name, run_dir, steps, uri, arm, seed)
            if drc:
                failures.append(
                    f"{name}: dense maskclip eval exited {drc} (log {work}/logs/{name}.dense.log)"
                )
            if seed == 0 and args.dense:
                commands.append(show(dense_cmd(args, work, name, run_dir, uri, arm, 0)))
            # evaluations written before the metric names lost their "@" read the same
            metrics = {k.replace("R@", "R"): v for k, v in res["metrics"].items()}
            run_id = res["checkpoint"].get("mlflow_run_id")
            metrics.update(dense_metrics)
            metrics.update(training_end(uri, run_id))
            st = step_time(uri, run_id, spec.optim.batch_size)
            source = "mlflow samples_per_s"
            if st is None and wall is not None:
                st, source = wall / steps, "wall time / steps (includes start-up)"
            if st is not None:
                metrics["step_time_s"] = st
            results[arm].append(
                {
                    "seed": seed,
                    "metrics": metrics,
                    "step": res["checkpoint"]["step"],
                    "step_time_source": source,
                    "rows": res["rows"],
                }
            )

    summary = {
        arm: {
            key: mean_std([r["metrics"][key] for r in runs if key in r["metrics"]])
            for key, _ in METRICS
        }
        for arm, runs in results.items()
    }
    write_report(Path(args.out), args, results, summary, commands, failures, uri, data, started)
    print(f"wrote {args.out}")
    return 1 if failures else 0


def setup_line(args, total_minutes: float) -> str:
    from service.spec import load_spec

    spec = load_spec(ROOT / "jobs" / "repro" / f"{BASELINE}.yaml")
    steps = args.steps or spec.optim.max_steps
    v = spec.model_config_for(spec.model.vocab_size).vision
    return (
        f"Model {spec.model.size} ({v.image_size} px, patch {v.patch_size}, width {v.width}, "
        f"depth {v.depth}), batch {spec.optim.batch_size}, {steps} steps per run, "
        f"{args.seeds} seed(s) per arm; training took {total_minutes:.0f} min summed over the "
        "runs (MLflow start to end; evaluation adds about a minute per run). A contrastive loss well below ln(batch) = "
        f"{math.log(spec.optim.batch_size):.2f} and a logit scale moved off its initial "
        "14.3 show the models trained."
    )


def dense_section(args, results: dict) -> list[str]:
    """Per dense set: each arm's dense metrics beside the baselines (random init, raw pixels)."""
    if not args.dense:
        return []
    arms = list(results)
    lines = [
        "",
        "## Dense evaluation (patch tokens; mean ± sample std over seeds)",
        "",
        "The dense probe is a linear classifier on the frozen final-layer patch tokens (class "
        "token excluded), fit on the set's train split, scored per pixel on its test split "
        f"(first {args.dense_rows} rows of each); zero-shot segmentation matches each patch's "
        "token in the joint space to the class prompts. Beside each arm: the same probe on an "
        "untrained model of the same config (random init) and on each patch's raw pixels, "
        "measured beside every CLIP seed. A trained model's number means something only "
        "where it clears both baselines by a wide margin.",
    ]
    for j, root in enumerate(args.dense):
        tag = dense_tag(j, root)
        cols = arms + list(BASELINES)
        lines += [
            "",
            f"### `{root}`" + (" (main)" if j == 0 else ""),
            "",
            "| metric | "
            + " | ".join(
                f"{c} (n={len(results[c])})" if c in results else BASELINES[c] for c in cols
            )
            + " |",
            "|---|" + "---|" * len(cols),
        ]
        for key in DENSE:
            cells = []
            for c in cols:
                if c in results:
                    vals = [
                        r["metrics"][tag + key] for r in results[c] if tag + key in r["metrics"]
                    ]
                else:
                    k = f"{tag}baseline_{c}_{key}"
                    vals = [r["metrics"][k] for r in results.get(BASELINE, []) if k in r["metrics"]]
                cells.append(fmt(*mean_std(vals)))
            if any(c != "—" for c in cells):
                lines.append(f"| {dict(METRICS).get(key, key)} | " + " | ".join(cells) + " |")
    return lines


def write_report(out, args, results, summary, commands, failures, uri, data, started) -> None:
    arms = list(results)
    n = {arm: len(runs) for arm, runs in results.items()}
    total_minutes = sum(
        r["metrics"].get("run_minutes", 0.0) for runs in results.values() for r in runs
    )
    lines = [
        "# CLIP vs MaskCLIP on Fashion-MNIST",
        "",
        f"Generated by `benchmarks/repro.py` on {started:%Y-%m-%d %H:%M} UTC "
        f"({' '.join(shlex.quote(a) for a in sys.argv[1:]) or 'default arguments'}). "
        "Every number below was measured by that run; nothing is copied from the paper.",
        "",
        f"Hardware: {hardware()}.",
        "",
        "Data: Fashion-MNIST converted with `maskclip data convert --fashion-mnist` "
        f"({data}; train split for training and the probe's fit, test split for validation, "
        f"zero-shot, retrieval and the probe's score). {setup_line(args, total_minutes)}",
        "",
        "## Results (mean ± sample std over seeds)",
        "",
        "| metric | " + " | ".join(f"{a} (n={n[a]})" for a in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for key, label in METRICS:
        cells = [fmt(*summary[a][key]) for a in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sources = sorted({r["step_time_source"] for runs in results.values() for r in runs})
    lines += [
        "",
        f"Step time: seconds per training step at the job's batch size ({', '.join(sources) or 'n/a'}).",
    ]
    lines += dense_section(args, results)
    note = caption_note(Path(data) / "test")
    if note:
        lines += ["", note]
    lines += [
        "",
        "## Reading",
        "",
        "Computed, not judged: an arm's difference from CLIP counts only if |Δmean| exceeds "
        "the larger of the two arms' seed standard deviations.",
        "",
    ]
    lines += reading(arms, summary)
    lines += [
        "",
        "## Per run",
        "",
        "| run | step | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for arm, runs in results.items():
        for r in runs:
            cells = [f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "—" for k, _ in METRICS]
            lines.append(f"| {arm}-s{r['seed']} | {r['step']} | " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in failures]
    lines += [
        "",
        "## Commands",
        "",
        "Seed 0 of each arm (other seeds differ only in "
        "`run.seed` / `run.name`); MLflow: " + f"`{uri}`.",
        "",
        "```",
    ]
    lines += commands
    lines += ["```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
