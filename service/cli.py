"""`maskclip` command line: thin — parse arguments, call one function, map errors to exit 2.

maskclip run jobs/quickstart.yaml [--set optim.max_steps=200 ...]
maskclip validate jobs/s3.yaml            maskclip schema > jobspec.schema.json
maskclip sweep jobs/sweep.yaml            maskclip data synth --out data/shapes
maskclip submit | status | logs | stop | list | render    (Ray cluster / KubeRay)
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError
from .spec import SpecError, check_inputs, json_schema, load_spec

EXIT_BAD_INPUT = 2


def spec_args(p: argparse.ArgumentParser) -> None:
    """The SPEC argument and repeatable --set overrides (shared by run/validate/submit/...)."""
    p.add_argument("spec", help="job YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. --set optim.max_steps=200 (repeatable)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    if spec.sweep is not None:
        from .sweep_spec import validate_sweep

        validate_sweep(spec)
    print(spec.to_yaml(), end="")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .trainer import run_job

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    run_job(spec)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .tune import run_sweep

    spec = load_spec(args.spec, args.overrides)
    check_inputs(spec)
    run_sweep(spec)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskclip", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    for module in ("data_cli", "cluster_cli", "eval_cli"):
        try:
            mod = __import__(f"service.{module}", fromlist=["register"])
        except ImportError as e:
            if e.name != f"service.{module}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SpecError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - known run endings carry their own exit code
        if type(e).__name__ == "RunStopped":
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
