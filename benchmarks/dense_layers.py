"""Which layer's patch tokens carry the local semantics? The dense probe after each block.

    python benchmarks/dense_layers.py --dense data/fmnist-val \\
        runs/repro/checkpoints/clip-s0 runs/repro/checkpoints/maskclip-s0 ...

For each checkpoint and each depth N (1..the image tower's depth) it runs
    maskclip eval CKPT --dense-probe DENSE --dense-blocks N --dense-baseline random --json ...
and prints one table: dense-probe mIoU per checkpoint and depth, with the random-init model's
at the same depth beside it. Choose the layer on a validation root (a train/ and a test/ cut
from the training split), never on the test split the reproduction reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def depth_of(ckpt: str) -> int:
    from service.checkpoint import load_model
    from service.evaluation import resolve_checkpoint

    model = load_model(resolve_checkpoint(ckpt))[0]
    return len(model.visual.trunk.blocks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint or run folders")
    p.add_argument("--dense", required=True, help="dense-labelled root with train/ and test/")
    p.add_argument("--max-rows", type=int, default=2000)
    p.add_argument("--depth", type=int, default=None, help="blocks in the image tower")
    args = p.parse_args()
    depth = args.depth or depth_of(args.checkpoints[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.checkpoints:
            row = {"checkpoint": ckpt}
            for n in range(1, depth + 1):
                out = Path(tmp) / f"{len(rows)}-{n}.json"
                cmd = [sys.executable, "-m", "service.cli", "eval", ckpt, "--dense-probe"]
                cmd += [args.dense, "--dense-blocks", str(n), "--dense-baseline", "random"]
                cmd += ["--max-rows", str(args.max_rows), "--no-mlflow", "-q", "--json", str(out)]
                rc = subprocess.call(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
                if rc != 0:
                    print(f"{ckpt} blocks {n}: maskclip eval exited {rc}", file=sys.stderr)
                    continue
                m = json.loads(out.read_text())["metrics"]
                row[n] = (m["dense_probe_miou"], m["dense_probe_random_miou"])
                print(f"{ckpt} blocks {n}: {row[n][0]:.3f} (random init {row[n][1]:.3f})")
            rows.append(row)
    print()
    print("| checkpoint | " + " | ".join(f"after block {n}" for n in range(1, depth + 1)) + " |")
    print("|---|" + "---|" * depth)
    for row in rows:
        cells = [f"{row[n][0]:.3f}" if n in row else "—" for n in range(1, depth + 1)]
        print(f"| {Path(row['checkpoint']).name} | " + " | ".join(cells) + " |")
    base = rows[0]
    cells = [f"{base[n][1]:.3f}" if n in base else "—" for n in range(1, depth + 1)]
    print("| random init | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
