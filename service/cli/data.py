"""`maskclip data ...`: make, convert and inspect Parquet datasets (see service.datasets).

maskclip data synth --out data/shapes --rows 5000 [--val-rows 1000]
maskclip data synth --out data/scenes --rows 5000 --test-rows 1000 --objects 3 --image-size 64
maskclip data convert --images photos/ --captions captions.csv --out s3://bucket/photos
maskclip data convert --images photos/ --masks masks/ [--classes classes.txt] --out data/seg
maskclip data convert --fashion-mnist --out data/fmnist [--limit 2000]
maskclip data convert --fashion-mnist --val-rows 5000 --out data/fmnist-val
maskclip data convert --fashion-mnist --mosaic 2 --image-size 64 --out data/fmnist-mosaic
maskclip data inspect data/shapes
"""

from __future__ import annotations

import argparse

from .. import datasets
from ..errors import UserError


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint for s3:// URIs (default $AWS_ENDPOINT_URL); credentials come from the "
        "environment",
    )
    p.add_argument("--region", default=None, help="S3 region (default $AWS_REGION or us-east-1)")


def _write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace shards already at --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _storage_args(p)


def _report(stats: dict) -> None:
    if "rows" not in stats:  # several splits
        for split, s in stats.items():
            print(f"{split}: ", end="")
            _report(s)
        return
    line = f"wrote {stats['rows']} rows in {stats['shards']} shard(s) to {stats['out']}"
    skipped = stats.get("skipped") or {}
    if skipped or stats.get("bad"):
        detail = ", ".join(f"{v} {k}" for k, v in skipped.items()) or f"{stats['bad']} bad"
        line += f"; skipped {detail}"
    print(line)


def cmd_synth(args: argparse.Namespace) -> int:
    stats = datasets.synth(
        args.out,
        args.rows,
        image_size=args.image_size,
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        val_rows=args.val_rows,
        test_rows=args.test_rows,
        objects=args.objects,
        endpoint_url=args.endpoint_url,
        region=args.region,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    _report(stats)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    common = dict(
        rows_per_shard=args.rows_per_shard,
        endpoint_url=args.endpoint_url,
        region=args.region,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    if args.fashion_mnist and (args.masks or args.classes):
        raise UserError(
            "--masks/--classes are for --images; Fashion-MNIST masks come with --mosaic"
        )
    given = [flag for flag, v in (("--mosaic", args.mosaic), ("--val-rows", args.val_rows)) if v]
    if not args.fashion_mnist and given:
        raise UserError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for --fashion-mnist"
        )
    if args.fashion_mnist:
        stats = datasets.convert_fashion_mnist(
            args.out,
            source_dir=args.source or datasets.FASHION_MNIST_DIR,
            image_size=args.image_size,
            limit=args.limit,
            seed=args.seed,
            mosaic=args.mosaic,
            val_rows=args.val_rows,
            **common,
        )
    else:
        stats = datasets.convert_folder(
            args.images,
            args.captions,
            args.out,
            max_size=args.max_size,
            quality=args.quality,
            limit=args.limit,
            masks=args.masks,
            classes=args.classes,
            **common,
        )
    _report(stats)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info = datasets.inspect(
        args.uri,
        endpoint_url=args.endpoint_url,
        region=args.region,
        samples=args.samples,
        check_rows=args.check_rows,
    )
    print(datasets.format_inspect(info))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="make, convert and inspect Parquet datasets")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="generate the synthetic shapes dataset")
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--val-rows", type=int, default=0, help="also write OUT/val (OUT/train then)")
    s.add_argument("--test-rows", type=int, default=0, help="also write OUT/test (OUT/train then)")
    s.add_argument(
        "--objects",
        type=int,
        default=0,
        metavar="N",
        help="scenes of N shapes (1-7) with a per-pixel class `mask` column and classes.txt "
        "(dense labels); default: one shape per image, no mask",
    )
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    _write_args(s)
    s.set_defaults(func=cmd_synth)

    c = sub.add_parser(
        "convert",
        help="a folder of captioned images, or Fashion-MNIST, to Parquet shards",
        description="--images DIR [--captions CSV|JSONL] (sidecar .txt captions when omitted), "
        "or --fashion-mnist (writes OUT/train and OUT/test, and OUT/val with --val-rows)",
    )
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images")
    src.add_argument("--fashion-mnist", action="store_true", help="the Fashion-MNIST idx files")
    c.add_argument(
        "--captions",
        metavar="FILE",
        help="CSV/TSV (file,caption[,label]) or JSONL; default: a .txt next to each image",
    )
    c.add_argument(
        "--source",
        metavar="DIR",
        help=f"Fashion-MNIST folder (default {datasets.FASHION_MNIST_DIR})",
    )
    c.add_argument(
        "--masks",
        metavar="DIR",
        help="folder of per-pixel class masks (PNG, 8-bit, the image's size, value = class "
        "index, 255 = ignore) at each image's relative path with .png: a `mask` column",
    )
    c.add_argument(
        "--classes",
        metavar="FILE",
        help="class names, line i = class i (default: classes.txt in --masks)",
    )
    c.add_argument("--max-size", type=int, default=256, help="longer image side (folder)")
    c.add_argument("--quality", type=int, default=90, help="JPEG quality (folder)")
    c.add_argument("--image-size", type=int, default=32, help="image side (Fashion-MNIST)")
    c.add_argument(
        "--seed", type=int, default=0, help="caption templates, mosaic items (Fashion-MNIST)"
    )
    c.add_argument(
        "--mosaic",
        type=int,
        default=0,
        metavar="K",
        help="Fashion-MNIST: K x K items per image (2 or 3), each resized to IMAGE_SIZE/K, with a "
        "per-pixel class `mask` column and classes.txt (dense labels)",
    )
    c.add_argument(
        "--val-rows",
        type=int,
        default=0,
        metavar="N",
        help="Fashion-MNIST: also write OUT/val, the last N rows of the train file (OUT/train "
        "gets the rest): choose settings on val/, report on the untouched test/",
    )
    c.add_argument("--limit", type=int, default=None, help="at most N rows (per split)")
    _write_args(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="summarise a dataset: rows, columns, labels, bad images")
    i.add_argument("uri", help="folder, file, glob or s3://bucket/prefix")
    i.add_argument("--samples", type=int, default=3)
    i.add_argument("--check-rows", type=int, default=1000, help="decode the first N images")
    _storage_args(i)
    i.set_defaults(func=cmd_inspect)
