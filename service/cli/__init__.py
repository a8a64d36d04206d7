"""`maskclip` command line: thin — parse arguments, call one function, map errors to exit codes.

maskclip run jobs/quickstart.yaml [--set optim.max_steps=200 ...]
maskclip validate jobs/s3.yaml            maskclip schema > jobspec.schema.json
maskclip sweep jobs/sweep.yaml            maskclip data synth --out data/shapes
maskclip eval CHECKPOINT --zero-shot DIR  maskclip submit | status | logs | stop | list | render

Sub-commands are registered statically (service.cli.train, .data, .eval, .cluster); each module
imports only argparse at the top, so `--help`, `schema`, `validate` and the cluster commands never
load torch or ray. Errors map to exit codes here and nowhere else.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RunStopped, UserError
from . import cluster, data, train
from . import eval as eval_cmd
from .common import spec_args

__all__ = ["build_parser", "main", "spec_args"]

SUBCOMMANDS = (train, data, eval_cmd, cluster)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskclip",
        description="Train MaskCLIP (CLIP + masked self-distillation) with Ray; track it in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
