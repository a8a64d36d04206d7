"""`maskclip run | validate | schema | sweep`: train a job, check a spec, print the schema."""

from __future__ import annotations

import argparse
import json

from .common import spec_args


def cmd_validate(args: argparse.Namespace) -> int:
    from ..spec import check_inputs, load_spec

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    if spec.sweep is not None:
        from ..sweep_spec import validate_sweep

        validate_sweep(spec)
    resume = _resume_line(spec)
    if args.json:
        doc = {"resume": resume, "spec": spec.model_dump(mode="json")}
        print(json.dumps(doc, indent=2))
        return 0
    print(f"# {resume}")
    print(spec.to_yaml(), end="")
    return 0


def _resume_line(spec) -> str:
    """Whether `maskclip run` of this spec would start fresh or resume, and from which step
    (the storage is only listed: nothing is created, nothing imports torch or ray)."""
    from ..checkpoint import find_latest
    from ..errors import UserError
    from ..storage import is_s3, split_uri

    uri = spec.storage_path()
    try:
        fs, root = split_uri(uri, spec.storage)
        latest = find_latest(root, spec.run.name, fs if is_s3(fs) else None, verify=False)
    except (OSError, UserError) as e:
        return f"run {spec.run.name}: cannot tell whether it resumes ({e})"
    if latest is None:
        return f"run {spec.run.name}: starts fresh (no checkpoint under {uri})"
    return f"run {spec.run.name}: resumes from the checkpoint at step {latest[1]['step']}"


def cmd_schema(args: argparse.Namespace) -> int:
    from ..spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..spec import check_inputs, load_spec
    from ..trainer import run_job

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    run_job(spec, fresh=args.fresh)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..spec import check_inputs, load_spec
    from ..tune import run_sweep

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    run_sweep(spec)
    return 0


def cmd_node_preempt(args: argparse.Namespace) -> int:
    import os

    from ..control import preempt_node
    from ..errors import ClusterError

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("node-preempt: no Ray address (--address or $RAY_ADDRESS)")
    node_id, record, waited = preempt_node(address, args.node_id, args.within)
    if record is not None:
        print(
            f"node {node_id[:12]}: the run checkpointed at step {record['step']} "
            f"{waited:.1f} s after the notice; the node can go"
        )
    else:
        print(f"node {node_id[:12]}: no run checkpointed within {waited:.0f} s; the node can go")
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="train a job (embedded local Ray unless scaling.ray_address)")
    spec_args(p)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: set this run name's checkpoints aside (kept) and open a new MLflow run",
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="resolve and check a spec, print it, run nothing")
    spec_args(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"resume": the resume line, "spec": the resolved spec} as JSON',
    )
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the JSON Schema of the job spec")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser(
        "node-preempt",
        help="a Ray node is going away (a worker pod's preStop hook): drain it, wait until the "
        "run on it has checkpointed",
    )
    p.add_argument("--address", help="the Ray cluster (GCS host:port); default $RAY_ADDRESS")
    p.add_argument("--node-id", help="the Ray node to drain; default this machine's worker node")
    p.add_argument(
        "--within",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="when the node goes: Ray's drain deadline and the longest wait (default 120)",
    )
    p.set_defaults(func=cmd_node_preempt)
    p = sub.add_parser("sweep", help="Ray Tune sweep over the spec's sweep: section")
    spec_args(p)
    p.set_defaults(func=cmd_sweep)
