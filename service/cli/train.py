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
    print(spec.to_yaml(), end="")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from ..spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..spec import check_inputs, load_spec
    from ..trainer import run_job

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    run_job(spec)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..spec import check_inputs, load_spec
    from ..tune import run_sweep

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    run_sweep(spec)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="train a job (embedded local Ray unless scaling.ray_address)")
    spec_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="resolve and check a spec, print it, run nothing")
    spec_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the JSON Schema of the job spec")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("sweep", help="Ray Tune sweep over the spec's sweep: section")
    spec_args(p)
    p.set_defaults(func=cmd_sweep)
