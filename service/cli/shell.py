"""`maskclip completion bash|zsh`: print a shell completion script (shtab, from this parser).

    maskclip completion bash > ~/.local/share/bash-completion/completions/maskclip
    maskclip completion zsh > "${fpath[1]}/_maskclip"
    eval "$(maskclip completion bash)"          # this shell only

The script is static (generated from the argparse tree): completing a word starts no Python.
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")


def cmd_completion(args: argparse.Namespace) -> int:
    from ..errors import UserError

    try:
        import shtab
    except ImportError:
        raise UserError("completion needs the shtab package: pip install shtab") from None
    from . import build_parser

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "completion",
        help="print a bash or zsh completion script",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=cmd_completion)
