"""`maskclip` command line: thin — parse arguments, call one function, map errors to exit codes.

maskclip run jobs/quickstart.yaml [--set optim.max_steps=200 ...]
maskclip validate jobs/s3.yaml            maskclip schema > jobspec.schema.json
maskclip sweep jobs/sweep.yaml            maskclip data synth --out data/shapes
maskclip eval CHECKPOINT --zero-shot DIR  maskclip submit | status | logs | stop | list | render
maskclip completion bash|zsh              maskclip --version    -v / -q on any command

Sub-commands are registered statically (service.cli.train, .data, .eval, .cluster); each module
imports only argparse at the top, so `--help`, `schema`, `validate` and the cluster commands never
load torch or ray. Errors map to exit codes here and nowhere else; the `maskclip` logger
(service.terminal) is configured here, once, from -v / -q.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RunStopped, UserError
from . import cluster, data, shell, train
from . import eval as eval_cmd
from .common import spec_args

__all__ = ["build_parser", "main", "spec_args"]

SUBCOMMANDS = (train, data, eval_cmd, cluster, shell)


def version() -> str:
    """The installed package's version (importlib.metadata: no import of the package's code)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("maskclip-service")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """--version, resolved only when given (the metadata lookup costs a few ms)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"maskclip {version()}")
        parser.exit()


def _verbosity_args(p: argparse.ArgumentParser, default) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbose",
        action="store_const",
        const=1,
        default=default,
        help="also show debug lines and Ray's own log lines (else in the run's ray.log)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbose",
        action="store_const",
        const=-1,
        default=default,
        help="show only warnings, errors and results",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskclip",
        description="Train MaskCLIP (CLIP with masked self-distillation) on Ray, track runs in "
        "MLflow, evaluate checkpoints. Start with `maskclip run jobs/quickstart.yaml`; "
        "`maskclip COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _verbosity_args(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    for command in sub.choices.values():  # -v / -q after the command too
        _verbosity_args(command, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .. import terminal

    terminal.configure(args.verbose)
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
    except Exception as e:  # noqa: BLE001 - Ray's own errors: one line, the details in the log
        if not type(e).__module__.startswith("ray.") or args.verbose > 0:
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        from .. import terminal

        where = terminal.ray_log_path()
        more = (
            f" (Ray's log: {where}; -v for the traceback)" if where else " (-v for the traceback)"
        )
        print(f"error: {type(e).__name__}: {lines[0][:300]}{more}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
