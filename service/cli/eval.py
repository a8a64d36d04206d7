"""`maskclip eval RUN_OR_CHECKPOINT ...`: zero-shot, retrieval and linear probe of a checkpoint.

maskclip eval runs/checkpoints/quickstart --zero-shot data/shapes/val --retrieval data/shapes/val
maskclip eval runs:/<mlflow run id> --zero-shot data/fmnist/test --linear-probe data/fmnist
maskclip eval s3://bucket/ckpts/myrun --zero-shot s3://bucket/data/val --no-mlflow
maskclip eval runs/checkpoints/scenes --dense-probe data/scenes --zero-shot-seg data/scenes \
    --dense-baseline pixels --dense-baseline random
"""

from __future__ import annotations

import argparse
import json
import logging

from ..errors import UserError

log = logging.getLogger("maskclip.cli.eval")

_LABELS = {
    "zero_shot_top1": ("zero-shot top-1", "zero_shot"),
    "zero_shot_top5": ("zero-shot top-5", "zero_shot"),
    "linear_probe_top1": ("linear-probe top-1", "linear_probe_test"),
    "dense_probe_miou": ("dense-probe mIoU", "dense_probe_test"),
    "dense_probe_pixel_accuracy": ("dense-probe pixel acc", "dense_probe_test"),
    "dense_probe_pixels_miou": ("  pixels baseline mIoU", "dense_probe_test"),
    "dense_probe_pixels_pixel_accuracy": ("  pixels baseline acc", "dense_probe_test"),
    "dense_probe_random_miou": ("  random-init mIoU", "dense_probe_test"),
    "dense_probe_random_pixel_accuracy": ("  random-init acc", "dense_probe_test"),
    "zero_shot_seg_miou": ("zero-shot seg mIoU", "zero_shot_seg"),
    "zero_shot_seg_pixel_accuracy": ("zero-shot seg pixel acc", "zero_shot_seg"),
}
# the closing lines, in this order: "<label>: <value to 3 decimals>"
_SUMMARY = (
    ("zero_shot_top1", "zero-shot top-1"),
    ("linear_probe_top1", "linear-probe top-1"),
    ("dense_probe_miou", "dense-probe mIoU"),
    ("dense_probe_pixel_accuracy", "dense-probe pixel accuracy"),
    ("dense_probe_pixels_miou", "dense-probe mIoU, raw-pixel baseline"),
    ("dense_probe_pixels_pixel_accuracy", "dense-probe pixel accuracy, raw-pixel baseline"),
    ("dense_probe_random_miou", "dense-probe mIoU, random-init baseline"),
    ("dense_probe_random_pixel_accuracy", "dense-probe pixel accuracy, random-init baseline"),
    ("zero_shot_seg_miou", "zero-shot seg mIoU"),
    ("zero_shot_seg_pixel_accuracy", "zero-shot seg pixel accuracy"),
)


def _label(name: str) -> tuple[str, str]:
    if name in _LABELS:
        return _LABELS[name]
    if name.startswith(("image_to_text_", "text_to_image_")):
        direction, k = name.rsplit("_", 1)
        shown = k.replace("R", "R@", 1)  # image_to_text_R10 -> img->text R@10
        return f"{direction.replace('_to_', '->').replace('image', 'img')} {shown}", "retrieval"
    return name, ""


def format_result(result: dict) -> str:
    ck = result["checkpoint"]
    step = "" if ck["step"] is None else f" step {ck['step']}"
    lines = [f"evaluated {ck['ref']} ({ck['kind']}{step}: {ck['path']})", ""]
    lines.append(f"  {'metric':<23} {'value':>7} {'rows':>7}")
    for name, value in result["metrics"].items():
        label, rows_key = _label(name)
        rows = result["rows"].get(rows_key, "")
        lines.append(f"  {label:<23} {value:>7.3f} {rows!s:>7}")
    for where, reasons in (result.get("skipped") or {}).items():
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        lines.append(f"  {where}: skipped {sum(reasons.values())} bad row(s) ({counts})")
    zs = result.get("zero_shot")
    if zs and len(zs["class_names"]) <= 20:
        names = [n[:10] for n in zs["class_names"]]
        lines += ["", "  zero-shot confusion matrix (rows: true, columns: predicted)"]
        lines.append("  " + " " * 13 + " ".join(f"{i:>5}" for i in range(len(names))))
        for i, (n, row) in enumerate(zip(names, zs["confusion_matrix"])):
            lines.append(f"  {i:>2} {n:<10}" + " ".join(f"{c:>5}" for c in row))
    dense = result.get("dense") or {}
    for task, title in (("dense_probe", "dense-probe"), ("zero_shot_seg", "zero-shot seg")):
        iou = (dense.get(task) or {}).get("iou")
        if iou and len(iou) <= 20:
            shown = "  ".join(
                f"{c[:12]} {'-' if v is None else f'{v:.2f}'}" for c, v in iou.items()
            )
            lines.append(f"  {title} IoU per class: {shown}")
    lines.append("")
    m = result["metrics"]
    for name, label in _SUMMARY:
        if name in m:
            lines.append(f"{label}: {m[name]:.3f}")
    ml = result.get("mlflow") or {}
    if ml.get("logged"):
        lines.append(f"mlflow run: {ml['run_id']} ({ml['uri']})")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate

    if not (
        args.zero_shot
        or args.retrieval
        or args.linear_probe
        or args.dense_probe
        or args.zero_shot_seg
    ):
        raise UserError(
            "give at least one of --zero-shot, --retrieval, --linear-probe, --dense-probe, "
            "--zero-shot-seg"
        )
    if args.dense_blocks is not None and not args.dense_probe:
        raise UserError("--dense-blocks needs --dense-probe (it picks the probe's tokens)")
    if args.dense_baseline and not args.dense_probe:
        raise UserError("--dense-baseline needs --dense-probe (the baselines are probe numbers)")
    from .. import terminal

    if args.json == "-":
        terminal.stdout_for_data()
    caps = {} if args.max_rows is None else {"max_rows": args.max_rows}
    tasks = [
        f"{name} on {where}"
        for name, where in (
            ("zero-shot", args.zero_shot),
            ("retrieval", args.retrieval),
            ("linear probe", args.linear_probe),
            ("dense probe", args.dense_probe),
            ("zero-shot seg", args.zero_shot_seg),
        )
        if where
    ]
    log.info(f"evaluating {args.ref}: {', '.join(tasks)}")
    result = evaluate(
        args.ref,
        zero_shot=args.zero_shot,
        retrieval=args.retrieval,
        linear_probe=args.linear_probe,
        dense_probe=args.dense_probe,
        zero_shot_seg=args.zero_shot_seg,
        dense_baselines=tuple(args.dense_baseline or ()),
        dense_blocks=args.dense_blocks,
        templates=args.templates,
        batch_size=args.batch_size,
        probe_rows=args.probe_rows,
        endpoint_url=args.endpoint_url,
        tracking_uri=args.tracking_uri,
        log_mlflow=args.mlflow,
        device=args.device,
        label_column=args.label_column,
        **caps,
    )
    if args.json == "-":
        print(json.dumps(result, indent=1))
        return 0
    print(format_result(result), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: zero-shot, retrieval, linear probe, dense probe, zero-shot seg",
        description="RUN_OR_CHECKPOINT: a checkpoint folder, a run folder (newest checkpoint), "
        "s3://..., runs:/<mlflow run id> or a bare MLflow run id, or a model/ artifact folder.",
    )
    p.add_argument(
        "ref",
        metavar="RUN_OR_CHECKPOINT",
        help="checkpoint or run folder, s3://..., runs:/<run id>, a run id, or "
        "models:/<name>@<alias> (e.g. models:/quickstart@champion)",
    )
    p.add_argument("--zero-shot", metavar="DATA", help="labelled Parquet data (label column)")
    p.add_argument("--retrieval", metavar="DATA", help="Parquet image-caption pairs")
    p.add_argument("--linear-probe", metavar="ROOT", help="a dataset root with train/ and test/")
    p.add_argument(
        "--dense-probe",
        metavar="ROOT",
        help="a dense-labelled root (mask column, classes.txt beside the shards) with train/ and "
        "test/: linear probe on the final-layer patch tokens, per-pixel mIoU / pixel accuracy",
    )
    p.add_argument(
        "--zero-shot-seg",
        metavar="DATA",
        help="dense-labelled data (a split folder, or a root whose test/ is used): patch tokens "
        "in the joint space matched to the class prompts, per-pixel mIoU / pixel accuracy",
    )
    p.add_argument(
        "--dense-baseline",
        action="append",
        choices=("pixels", "random"),
        help="also run the dense probe on each patch's raw pixels (pixels) or on a random-init "
        "model of the checkpoint's config (random); repeatable",
    )
    p.add_argument(
        "--dense-blocks",
        type=int,
        metavar="N",
        help="probe the patch tokens after the first N transformer blocks (negative: all but "
        "the last -N) instead of the final layer; zero-shot seg stays on the final layer",
    )
    p.add_argument(
        "--templates",
        metavar="FILE|SET",
        help="zero-shot prompts: a file (one per line with {}) or a set: default, shapes, "
        "fashion-mnist (default: the checkpoint's data.templates)",
    )
    p.add_argument(
        "--label-column",
        default=None,
        help="the zero-shot / probe label column (default: the checkpoint's data.label_column)",
    )
    p.add_argument(
        "--max-rows",
        type=_positive,
        default=None,
        help="cap every split: its first N usable rows (default: evaluation.MAX_ROWS, 5000, "
        "the same cap as in-loop validation)",
    )
    p.add_argument(
        "--probe-rows",
        type=_positive,
        default=None,
        help="cap the linear probe's train split (default: --max-rows or all)",
    )
    p.add_argument("--batch-size", type=_positive, default=256, help="rows encoded at a time")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default $MLFLOW_TRACKING_URI, else the run's own store)",
    )
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="log nothing")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default $AWS_ENDPOINT_URL)")
    p.add_argument(
        "--json",
        metavar="FILE",
        nargs="?",
        const="-",
        help="also write the full result as JSON to FILE; --json alone: print only the JSON",
    )
    p.set_defaults(func=cmd_eval)
