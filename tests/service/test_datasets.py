import csv
import io
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from maskclip.dense import IGNORE, decode_mask, encode_mask, parse_classes
from maskclip.synthetic import SHAPES, generate_scenes
from service import datasets
from service.cli import main
from service.errors import UserError
from tests.service.data_fixtures import make_dense_dataset, write_dense_split

IMG2DATASET = {"key": pa.string(), "jpg": pa.binary(), "caption": pa.string()}


def _read(path) -> pa.Table:
    files = sorted(Path(path).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _decodes(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ----------------------------------------------------------------------------- synth


def test_synth_shards_schema_and_determinism(tmp_path):
    stats = datasets.synth(str(tmp_path / "a"), rows=25, image_size=16, seed=1, rows_per_shard=10)
    assert stats["rows"] == 25 and stats["shards"] == math.ceil(25 / 10) and stats["bad"] == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [
        "_SUCCESS",
        "_manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [pq.ParquetFile(tmp_path / "a" / n).metadata.num_rows for n in names[2:]] == [10, 10, 5]
    table = _read(tmp_path / "a")
    for name, typ in {**IMG2DATASET, "label": pa.string()}.items():
        assert table.schema.field(name).type == typ
    assert table.column_names[:3] == ["key", "jpg", "caption"]
    assert len(set(table.column("key").to_pylist())) == 25
    assert _decodes(table.column("jpg")[0].as_py()).size == (16, 16)
    manifest = json.loads((tmp_path / "a" / "_manifest.json").read_text())
    assert manifest["rows"] == 25 and sum(manifest["labels"].values()) == 25

    datasets.synth(str(tmp_path / "b"), rows=25, image_size=16, seed=1, rows_per_shard=7)
    datasets.synth(str(tmp_path / "c"), rows=25, image_size=16, seed=2, rows_per_shard=10)
    assert _read(tmp_path / "b").equals(table)  # same rows whatever the sharding
    assert _read(tmp_path / "c").column("jpg") != table.column("jpg")


def test_synth_val_split_and_overwrite(tmp_path):
    out = str(tmp_path / "d")
    stats = datasets.synth(out, rows=12, val_rows=5, image_size=16, rows_per_shard=100)
    assert stats["train"]["rows"] == 12 and stats["val"]["rows"] == 5
    train, val = _read(tmp_path / "d" / "train"), _read(tmp_path / "d" / "val")
    assert not set(train.column("key").to_pylist()) & set(val.column("key").to_pylist())

    with pytest.raises(UserError, match="already holds a dataset"):
        datasets.synth(out + "/train", rows=3, image_size=16)
    datasets.synth(out + "/train", rows=3, image_size=16, overwrite=True)
    assert _read(tmp_path / "d" / "train").num_rows == 3
    assert not list((tmp_path / "d" / "train").glob(".*"))  # no temporary files left


def test_synth_scenes_write_masks_and_classes(tmp_path):
    out = make_dense_dataset(tmp_path, rows=10, test_rows=6, image_size=24, objects=3)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["_SUCCESS", "_manifest.json", "classes.txt", "part-00000.parquet"]
    classes = parse_classes((out / "test" / "classes.txt").read_text())
    assert classes == ["background", *SHAPES]
    train, test = _read(out / "train"), _read(out / "test")
    assert train.column_names == ["key", "jpg", "caption", "label", "colour", "mask"]
    assert train.schema.field("mask").type == pa.binary()
    assert test.column("key").to_pylist() == [f"{i:09d}" for i in range(10, 16)]  # after train
    want = generate_scenes(6, image_size=24, seed=0, start=10, objects=3)
    for row, scene in zip(test.to_pylist(), want):
        mask = decode_mask(row["mask"], size=(24, 24), num_classes=len(classes))
        present = {classes[c] for c in set(mask.ravel().tolist()) - {0, IGNORE}}
        assert present == {o["shape"] for o in scene["objects"]}
        assert row["label"] in present and row["caption"] == scene["caption"]
    manifest = json.loads((out / "train" / "_manifest.json").read_text())
    assert manifest["classes"] == classes and manifest["rows"] == 10

    # overwrite replaces classes.txt with the rest; a plain synth leaves none behind
    datasets.synth(str(out / "train"), rows=3, image_size=16, overwrite=True, progress=False)
    assert not (out / "train" / "classes.txt").exists()
    assert "mask" not in _read(out / "train").column_names
    with pytest.raises(UserError, match=r"objects must be between 1 and 7 \(got 8\)"):
        datasets.synth(str(tmp_path / "x"), rows=2, objects=8)


def test_write_shards_skips_bad_rows_and_keeps_extra_columns(tmp_path):
    jpg = datasets_row_jpg()
    rows = [
        {"key": 1, "jpg": jpg, "caption": "one", "score": 0.5},
        {"key": "2", "jpg": b"", "caption": "no image"},
        {"key": "3", "jpg": jpg, "caption": "  "},
        {"jpg": jpg, "caption": "no key", "score": 1.5},
    ]
    stats = datasets.write_shards(rows, str(tmp_path / "w"), rows_per_shard=1, progress=False)
    assert (stats["rows"], stats["bad"], stats["shards"]) == (2, 2, 2)
    table = _read(tmp_path / "w")
    assert table.column_names == ["key", "jpg", "caption", "score"]
    assert table.column("key").to_pylist() == ["1", "000000001"]
    assert stats["labels"] is None
    with pytest.raises(UserError, match="no rows"):
        datasets.write_shards([], str(tmp_path / "empty"), progress=False)
    assert not (tmp_path / "empty" / "_SUCCESS").exists()


def datasets_row_jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- convert folder


@pytest.fixture()
def image_folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (400, 200), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(d / "green.jpg", quality=90)
    Image.new("L", (50, 80), 128).save(d / "sub" / "grey.png")
    Image.new("RGBA", (30, 30), (0, 0, 255, 100)).save(d / "alpha.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(d / "nocap.png")
    captions = {
        "red.png": ("a red rectangle", "red"),
        "green.jpg": ("a green square", "green"),
        "sub/grey.png": ("a grey image", "grey"),
        "alpha.png": ("a translucent blue square", "blue"),
        "broken.jpg": ("a corrupt file", "bad"),
    }
    return d, captions


def _check_converted(
    out: Path, stats: dict, capsys, with_labels: bool, no_caption: str = "missing caption"
):
    err = capsys.readouterr().err
    assert stats["rows"] == 4 and stats["seen"] == 6
    assert stats["skipped"] == {"corrupt image": 1, no_caption: 1}  # service.rows' reasons
    assert "broken.jpg" in err and "nocap.png" in err
    assert len([line for line in err.splitlines() if line.startswith("warning:")]) == 2
    table = _read(out)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {"red.png", "green.jpg", "sub/grey.png", "alpha.png"}
    for r in rows.values():
        img = _decodes(r["jpg"])
        assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 128
    assert _decodes(rows["red.png"]["jpg"]).size == (128, 64)
    assert _decodes(rows["sub/grey.png"]["jpg"]).size == (50, 80)
    r, g, b = _decodes(rows["alpha.png"]["jpg"]).convert("RGB").getpixel((15, 15))
    assert r > 100 and b > 200  # composited on white
    assert rows["green.jpg"]["caption"] == "a green square"
    if with_labels:
        assert rows["green.jpg"]["label"] == "green"
    else:
        assert "label" not in table.column_names


def test_convert_folder_csv(image_folder, tmp_path, capsys):
    d, captions = image_folder
    csv_path = tmp_path / "captions.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "caption", "label"])
        for name, (cap, label) in captions.items():
            w.writerow([name, cap, label])
        w.writerow(["nocap.png", "", "x"])
    stats = datasets.convert_folder(str(d), str(csv_path), str(tmp_path / "out"), max_size=128)
    _check_converted(tmp_path / "out", stats, capsys, True, no_caption="empty caption")


def test_convert_folder_jsonl(image_folder, tmp_path, capsys):
    d, captions = image_folder
    path = tmp_path / "captions.jsonl"
    lines = [
        json.dumps({"image": n, "caption": c, "label": lab}) for n, (c, lab) in captions.items()
    ]
    lines.append(json.dumps({"file": "nocap.png"}))
    path.write_text("\n".join(lines) + "\n\n")
    stats = datasets.convert_folder(str(d), str(path), str(tmp_path / "out"), max_size=128)
    _check_converted(tmp_path / "out", stats, capsys, with_labels=True)

    path.write_text('{"file": "red.png", "caption": "x"}\n{not json\n')
    with pytest.raises(UserError, match=r"captions.jsonl: invalid JSON at line 2"):
        datasets.convert_folder(str(d), str(path), str(tmp_path / "out2"))


def test_convert_folder_sidecar_txt(image_folder, tmp_path, capsys):
    d, captions = image_folder
    for name, (cap, _) in captions.items():
        (d / name).with_suffix(".txt").write_text(cap + "\n")
    stats = datasets.convert_folder(str(d), None, str(tmp_path / "out"), max_size=128)
    _check_converted(tmp_path / "out", stats, capsys, with_labels=False)


def test_convert_folder_errors(image_folder, tmp_path, capsys):
    d, _ = image_folder
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,text\nred.png,hi\n")
    with pytest.raises(UserError, match=r"bad.csv: needs a file column .* header has: name, text"):
        datasets.convert_folder(str(d), str(bad_csv), str(tmp_path / "o"))
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text("file,caption\nbroken.jpg,x\nmissing.png,y\n")
    with pytest.raises(UserError, match="no usable images"):
        datasets.convert_folder(str(d), str(only_bad), str(tmp_path / "o"))
    assert "missing.png: cannot read" in capsys.readouterr().err
    with pytest.raises(
        UserError, match=r"no usable images \(6 entries, all skipped: 6 missing caption"
    ):
        datasets.convert_folder(str(d), None, str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found with sidecar"):
        datasets.convert_folder(str(tmp_path / "empty"), None, str(tmp_path / "o"))
    ok_csv = tmp_path / "ok.csv"
    ok_csv.write_text("file,caption\nred.png,red\n")
    datasets.convert_folder(str(d), str(ok_csv), str(tmp_path / "o"))
    with pytest.raises(UserError, match="already holds a dataset"):
        datasets.convert_folder(str(d), str(ok_csv), str(tmp_path / "o"))
    with pytest.raises(UserError, match="images folder not found"):
        datasets.convert_folder(str(tmp_path / "nope"), None, str(tmp_path / "o"))


def _write_mask(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mask(np.asarray(array, dtype=np.uint8)))


def test_convert_folder_with_masks(image_folder, tmp_path, capsys):
    d, captions = image_folder
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("file,caption\n" + "".join(f"{n},{c}\n" for n, (c, _) in captions.items()))
    masks = tmp_path / "masks"
    red = np.zeros((200, 400), np.uint8)
    red[:, 200:] = 2
    red[:10, :10] = IGNORE
    _write_mask(masks / "red.png", red)  # left half class 0, right half class 2
    _write_mask(masks / "green.png", np.full((64, 64), 3))  # past the 3 classes
    _write_mask(masks / "sub" / "grey.png", np.zeros((10, 10)))  # image is 50x80
    (masks / "broken.png").write_bytes(b"not a png")  # its image is broken anyway
    # alpha.png has no mask
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nsky\nroad\n")
    out = tmp_path / "out"
    stats = datasets.convert_folder(
        str(d), str(csv_path), str(out), max_size=128, masks=str(masks), classes=str(classes)
    )
    warnings = capsys.readouterr().err.splitlines()
    assert sorted(w for w in warnings if "mask" in w) == [
        f"warning: alpha.png: no mask {masks}/alpha.png (No such file or directory)",
        f"warning: green.jpg: mask {masks}/green.png: mask has class index 3 but classes.txt "
        "lists 3 classes (0..2, 255 = ignore)",
        f"warning: sub/grey.png: mask {masks}/sub/grey.png: mask is 10x10 but its image is 50x80",
    ]
    assert stats["rows"] == 1 and stats["skipped"] == {
        "corrupt image": 1,
        "bad mask": 2,
        "missing mask": 1,
    }
    assert (out / "classes.txt").read_text() == "background\nsky\nroad\n"
    (row,) = _read(out).to_pylist()
    assert row["key"] == "red.png"
    mask = decode_mask(row["mask"], size=_decodes(row["jpg"]).size, num_classes=3)
    assert mask.shape == (64, 128)  # resized with its image (nearest)
    assert (mask[:, :64] == 0).sum() > 0.95 * 64 * 64 and (mask[:, 64:] == 2).all()
    assert mask[0, 0] == IGNORE

    # the class list comes from masks/classes.txt by default; none there: one line
    with pytest.raises(UserError) as e:
        datasets.convert_folder(str(d), str(csv_path), str(tmp_path / "o2"), masks=str(masks))
    assert str(e.value) == (
        f"{masks}/classes.txt: classes file not found (pass the class list with --classes FILE)"
    )
    (masks / "classes.txt").write_text("background\nsky\nsky\n")
    with pytest.raises(UserError, match=r"classes.txt: classes.txt names 'sky' twice"):
        datasets.convert_folder(str(d), str(csv_path), str(tmp_path / "o2"), masks=str(masks))
    with pytest.raises(UserError, match="masks folder not found"):
        datasets.convert_folder(str(d), None, str(tmp_path / "o2"), masks=str(tmp_path / "no"))


def test_cli_convert_masks_one_line_per_bad_mask(image_folder, tmp_path, capsys):
    d, captions = image_folder
    for name, (cap, _) in captions.items():
        (d / name).with_suffix(".txt").write_text(cap)
    masks = tmp_path / "masks"
    _write_mask(masks / "red.png", np.ones((200, 400)))
    _write_mask(masks / "green.png", np.ones((64, 63)))
    (masks / "classes.txt").write_text("background\nthing\n")
    out = tmp_path / "o"
    argv = ["data", "convert", "--images", str(d), "--masks", str(masks), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote 1 rows in 1 shard(s) to {out}; skipped ")
    assert (
        f"warning: green.jpg: mask {masks}/green.png: mask is 63x64 but its image is 64x64\n"
        in (captured.err)
    )
    assert main(["data", "inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "classes (2): background, thing" in lines
    assert "mask pixel shares (1 masks, 0.0% ignored): background 0.000, thing 1.000" in lines
    assert main(["data", "convert", "--images", str(d), "--mosaic", "2", "--out", "x"]) == 2
    assert capsys.readouterr().err == "error: --mosaic is for --fashion-mnist\n"


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(
    not os.path.isdir(datasets.FASHION_MNIST_DIR),
    reason="Fashion-MNIST absent (apt-get install dataset-fashion-mnist)",
)
def test_convert_fashion_mnist(tmp_path):
    stats = datasets.convert_fashion_mnist(
        str(tmp_path / "fm"), image_size=32, rows_per_shard=15, limit=40, progress=False
    )
    assert stats["train"]["rows"] == 40 and stats["test"]["rows"] == 40
    assert stats["train"]["shards"] == 3
    for split in ("train", "test"):
        table = _read(tmp_path / "fm" / split)
        assert set(table.column("label").to_pylist()) <= set(datasets.FASHION_MNIST_CLASSES)
        assert _decodes(table.column("jpg")[0].as_py()).size == (32, 32)
        captions = table.column("caption").to_pylist()
        labels = table.column("label").to_pylist()
        assert all(lab in cap for cap, lab in zip(captions, labels))
        assert len(set(captions)) > 10
    train = _read(tmp_path / "fm" / "train")
    assert train.column("key")[0].as_py() == "train-00000"
    # the first training image of Fashion-MNIST is an ankle boot (label 9)
    assert train.column("label")[0].as_py() == "ankle boot"
    # single items are dense-labelled too: the garment's pixels are its class + 1
    classes = (tmp_path / "fm" / "train" / "classes.txt").read_text().splitlines()
    assert classes == ["background", *datasets.FASHION_MNIST_CLASSES]
    from maskclip.dense import IGNORE, decode_mask

    mask = decode_mask(train.column("mask")[0].as_py(), (32, 32), len(classes))
    assert set(np.unique(mask)) == {0, classes.index("ankle boot"), IGNORE}
    assert (mask == classes.index("ankle boot")).mean() > 0.2 and (mask == 0).mean() > 0.2
    again = datasets.convert_fashion_mnist(
        str(tmp_path / "fm2"), limit=40, rows_per_shard=40, progress=False
    )
    assert again["train"]["rows"] == 40
    assert _read(tmp_path / "fm2" / "train").equals(train)  # deterministic by seed


@pytest.mark.skipif(
    not os.path.isdir(datasets.FASHION_MNIST_DIR),
    reason="Fashion-MNIST absent (apt-get install dataset-fashion-mnist)",
)
def test_convert_fashion_mnist_mosaic(tmp_path, capsys):
    from maskclip.synthetic import cell_name, where_phrase

    out = tmp_path / "mos"
    argv = ["data", "convert", "--fashion-mnist", "--mosaic", "2", "--image-size", "32"]
    assert main([*argv, "--limit", "6", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"train: wrote 6 rows in 1 shard(s) to {out}/train",
        f"test: wrote 6 rows in 1 shard(s) to {out}/test",
    ]
    classes = parse_classes((out / "test" / "classes.txt").read_text())
    assert classes == ["background", *datasets.FASHION_MNIST_CLASSES]
    names = datasets.FASHION_MNIST_CLASSES
    raw = datasets.read_idx(
        Path(datasets.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz", limit=24
    )
    for split in ("train", "test"):
        table = _read(out / split)
        assert table.column_names == ["key", "jpg", "caption", "label", "mask"]
        for row in table.to_pylist():
            img = np.asarray(_decodes(row["jpg"]).convert("L"), dtype=np.float32)
            mask = decode_mask(row["mask"], size=(32, 32), num_classes=len(classes))
            items = []
            for k in range(4):
                r, c = divmod(k, 2)
                q, qi = mask[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16], img[r * 16 :, c * 16 :]
                qi = qi[:16, :16]
                fg = set(np.unique(q).tolist()) - {0, IGNORE}
                assert len(fg) == 1, fg  # one item per quadrant
                (cls,) = fg
                items.append(names[cls - 1])
                assert 0.1 < (q == cls).mean() < 0.95
                assert qi[q == cls].mean() > 60 > qi[q == 0].mean()  # foreground is bright
            assert row["label"] == items[0]  # top-left item
            words = row["caption"]
            if "top left" in words:  # "a sneaker at the top left, a bag at the top right, ..."
                for k, name in enumerate(items):
                    where = where_phrase(cell_name(k % 2, k // 2, 2))
                    assert f"{datasets._article(name)} {name} {where}" in words
            else:  # "four fashion items: a sneaker, a bag, a coat and a dress" (reading order)
                listed = [f"{datasets._article(n)} {n}" for n in items]
                assert ", ".join(listed[:3]) + " and " + listed[3] in words
    # train mosaics are made of train items: the 24 first are the pool with --limit 6
    train = _read(out / "train").to_pylist()
    first = np.asarray(_decodes(train[0]["jpg"]).convert("L"), dtype=np.float32)[:16, :16]
    from PIL import Image as _Image

    tiles = [
        np.asarray(_Image.fromarray(a).resize((16, 16), _Image.Resampling.BICUBIC)) for a in raw
    ]
    assert min(np.abs(first - t).mean() for t in tiles) < 4
    # deterministic by seed; another seed draws other items
    again = tmp_path / "again"
    datasets.convert_fashion_mnist(str(again), image_size=32, limit=6, mosaic=2, progress=False)
    assert _read(again / "train").equals(_read(out / "train"))
    other = tmp_path / "other"
    datasets.convert_fashion_mnist(
        str(other), image_size=32, limit=6, mosaic=2, seed=1, progress=False
    )
    assert _read(other / "train").column("mask") != _read(out / "train").column("mask")
    with pytest.raises(UserError, match="mosaic must be 2 or 3"):
        datasets.convert_fashion_mnist(str(tmp_path / "x"), mosaic=4, limit=1)
    with pytest.raises(UserError, match=r"image_size 31 does not split into 2x2 cells"):
        datasets.convert_fashion_mnist(str(tmp_path / "x"), mosaic=2, image_size=31, limit=1)


def _write_idx(path: Path, array: np.ndarray) -> None:
    import gzip
    import struct

    head = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(d: Path, train: int, test: int) -> dict[str, np.ndarray]:
    """Fashion-MNIST's four idx files with `train` / `test` items; item i of a file is a flat
    28x28 square of intensity 10 + 5 i (so a decoded row tells which item it was) and label
    i % 10. Returns the labels of each file."""
    d.mkdir(parents=True)
    labels = {}
    for split, n in (("train", train), ("t10k", test)):
        levels = 10 + 5 * np.arange(n)
        _write_idx(
            d / f"{split}-images-idx3-ubyte.gz", np.repeat(levels, 28 * 28).reshape(n, 28, 28)
        )
        labels[split] = np.arange(n) % 10
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels[split])
    return labels


def _items(table: pa.Table) -> list[int]:
    """Which fake item each row is (its decoded grey level)."""
    return [
        round((np.asarray(_decodes(b).convert("L"), dtype=np.float32).mean() - 10) / 5)
        for b in table.column("jpg").to_pylist()
    ]


def test_convert_fashion_mnist_holds_out_a_val_split(tmp_path, capsys):
    """--val-rows N: val/ is the last N rows of the train file, train/ the rows before them
    (the same rows, captions and keys as without --val-rows), test/ unchanged."""
    src = tmp_path / "src"
    labels = _fake_fashion_mnist(src, train=30, test=12)
    out, plain = tmp_path / "fm", tmp_path / "plain"
    argv = ["data", "convert", "--fashion-mnist", "--source", str(src), "--image-size", "28"]
    argv += ["--no-progress"]
    assert main([*argv, "--val-rows", "7", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"train: wrote 23 rows in 1 shard(s) to {out}/train",
        f"val: wrote 7 rows in 1 shard(s) to {out}/val",
        f"test: wrote 12 rows in 1 shard(s) to {out}/test",
    ]
    train, val, test = (_read(out / s) for s in ("train", "val", "test"))
    assert _items(train) == list(range(23))
    assert _items(val) == list(range(23, 30))  # the train file's last 7
    assert _items(test) == list(range(12))
    names = datasets.FASHION_MNIST_CLASSES
    assert val.column("label").to_pylist() == [names[y] for y in labels["train"][23:]]
    assert val.column("key").to_pylist() == [f"val-{i:05d}" for i in range(7)]
    assert (out / "val" / "classes.txt").read_text() == (out / "train" / "classes.txt").read_text()
    # without --val-rows: the same train rows (train/ just goes on) and the same test/
    assert main([*argv, "--out", str(plain)]) == 0
    capsys.readouterr()
    whole = _read(plain / "train")
    assert whole.num_rows == 30 and whole.slice(0, 23).equals(train)
    assert _read(plain / "test").equals(test)
    assert not (plain / "val").exists()
    # val draws its captions from its own seeded stream: [seed, 2] (train 0, test 1)
    rng = np.random.default_rng([0, 2])
    expected = [datasets.fashion_mnist_caption(int(y), rng) for y in labels["train"][23:]]
    assert val.column("caption").to_pylist() == expected
    # too many rows: one line, exit 2, nothing written
    assert main([*argv, "--val-rows", "30", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "error: val_rows 30: the train split has only 30 rows\n"
    assert not (tmp_path / "x").exists()
    assert main(["data", "convert", "--images", str(src), "--val-rows", "3", "--out", "x"]) == 2
    assert capsys.readouterr().err == "error: --val-rows is for --fashion-mnist\n"
    if os.path.isdir(datasets.FASHION_MNIST_DIR):  # the real train file: 60,000 rows
        with pytest.raises(UserError) as e:
            datasets.convert_fashion_mnist(str(tmp_path / "y"), val_rows=60000, progress=False)
        assert str(e.value) == "val_rows 60000: the train split has only 60000 rows"


def test_fashion_mnist_missing_data(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        datasets.convert_fashion_mnist(str(tmp_path / "o"), source_dir=str(tmp_path / "none"))


def test_read_idx(tmp_path):
    import gzip
    import struct

    import numpy as np

    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + a.tobytes())
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "x-idx3-ubyte.gz"), a)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "x-idx3-ubyte.gz", limit=1), a[:1])
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(UserError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "junk")


# ----------------------------------------------------------------------------- inspect


def test_inspect_reports_rows_columns_and_bad_images(tmp_path):
    out = tmp_path / "ds"
    rows = [
        {"key": f"{i}", "jpg": datasets_row_jpg(), "caption": f"c{i}", "label": "ab"[i % 2]}
        for i in range(9)
    ]
    rows[4]["jpg"] = b"\x89PNG\r\n\x1a\n truncated"
    datasets.write_shards(rows, str(out), rows_per_shard=4, progress=False)
    info = datasets.inspect(str(out), samples=2)
    assert info["rows"] == 9 and info["shards"] == 3 and info["complete"]
    assert info["columns"] == {
        "key": "string",
        "jpg": "binary",
        "caption": "string",
        "label": "string",
    }
    assert info["labels"] == {"a": 5, "b": 4}
    assert info["checked"] == 9 and info["bad_images"] == 1
    assert info["bad_examples"] == ["4: corrupt image"]  # service.rows' reason
    assert [s["caption"] for s in info["samples"]] == ["c0", "c1"]
    assert datasets.inspect(str(out), check_rows=3)["checked"] == 3
    text = datasets.format_inspect(info)
    assert text.splitlines()[-1] == "rows: 9"
    assert "1 not decodable" in text

    (out / "_SUCCESS").unlink()
    assert not datasets.inspect(str(out / "part-*.parquet"))["complete"]
    assert datasets.inspect(str(out / "part-00000.parquet"))["rows"] == 4
    (tmp_path / "notparquet").mkdir()
    (tmp_path / "notparquet" / "x.parquet").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"^dataset: cannot read Parquet schema of .*/x\.parquet: "):
        datasets.inspect(str(tmp_path / "notparquet"))
    with pytest.raises(UserError, match="^dataset: no files match"):
        datasets.inspect(str(tmp_path / "ds" / "..") + "/empty*")


def test_inspect_dense_classes_and_pixel_shares(tmp_path, capsys):
    from maskclip.dense import pixel_shares
    from maskclip.synthetic import scene_classes

    out = make_dense_dataset(tmp_path, rows=6, test_rows=2, image_size=24, objects=2)
    info = datasets.inspect(str(out / "train"))
    classes = scene_classes()
    assert info["classes"] == classes and info["classes_missing"] == []
    masks = [decode_mask(m) for m in _read(out / "train").column("mask").to_pylist()]
    want = pixel_shares(masks, len(classes))
    assert info["mask_shares"] == pytest.approx(dict(zip(classes, want)))
    ignored = sum(int((m == IGNORE).sum()) for m in masks) / (6 * 24 * 24)
    assert info["mask_ignored"] == pytest.approx(ignored)
    assert (info["masks_checked"], info["bad_masks"]) == (6, 0)
    assert main(["data", "inspect", str(out / "train")]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = lines.index("classes (9): " + ", ".join(classes))
    head, _, tail = lines[i + 1].partition("): ")
    assert head == f"mask pixel shares (6 masks, {ignored:.1%} ignored"
    parsed = dict(part.rsplit(" ", 1) for part in tail.split(", "))
    assert list(parsed) == classes
    assert [float(v) for v in parsed.values()] == pytest.approx(want, abs=5e-4)
    assert lines[i + 2] == "masks: 6 checked, 0 bad"

    # faults: no classes.txt; a mask of the wrong size; a class index past the list
    rows = _read(out / "test").to_pylist()
    rows[0]["mask"] = encode_mask(np.zeros((12, 24), np.uint8))
    rows[1]["mask"] = encode_mask(np.full((24, 24), 4, np.uint8))
    bad = tmp_path / "bad"
    write_dense_split(bad, rows)  # no classes.txt
    assert main(["data", "inspect", str(bad)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"classes: mask column but no classes.txt in {bad} (classes shown by index)" in lines
    # without the class list, shares by index; the size is still checked against the image
    i = lines.index("masks: 2 checked, 1 bad")
    assert lines[i - 1 : i + 2] == [
        "mask pixel shares (1 masks, 0.0% ignored): 0 0.000, 1 0.000, 2 0.000, 3 0.000, 4 1.000",
        "masks: 2 checked, 1 bad",
        f"  bad mask: {rows[0]['key']}: mask is 24x12 but its image is 24x24",
    ]
    write_dense_split(bad, rows, classes=["background", "a", "b"])
    info = datasets.inspect(str(bad))
    assert info["classes"] == ["background", "a", "b"] and info["classes_missing"] == []
    assert info["bad_masks"] == 2 and info["bad_mask_examples"] == [
        f"{rows[0]['key']}: mask is 24x12 but its image is 24x24",
        f"{rows[1]['key']}: mask has class index 4 but classes.txt lists 3 classes "
        "(0..2, 255 = ignore)",
    ]
    lines = datasets.format_inspect(info).splitlines()
    assert lines[lines.index("masks: 2 checked, 2 bad") + 1 :][:2] == [
        f"  bad mask: {rows[0]['key']}: mask is 24x12 but its image is 24x24",
        f"  bad mask: {rows[1]['key']}: mask has class index 4 but classes.txt lists 3 classes "
        "(0..2, 255 = ignore)",
    ]
    (bad / "classes.txt").write_text("a\na\n")
    info = datasets.inspect(str(bad))
    assert info["classes"] is None and info["classes_missing"] == []
    assert (
        info["classes_error"] == f"{bad}/classes.txt: classes.txt names 'a' twice (lines 1 and 2)"
    )


def test_training_reader_skips_the_mask_column_and_classes_file(tmp_path):
    from service.storage import resolve_source

    out = make_dense_dataset(tmp_path, rows=3, test_rows=1, image_size=16)
    source = resolve_source(str(out / "train"))
    assert [Path(p).name for p in source.paths] == ["part-00000.parquet"]  # not classes.txt
    # service.data.build_dataset reads only the columns it names (image, caption, label, status)
    (batch,) = list(source.iter_batches(["jpg", "caption"]))
    assert batch.schema.names == ["jpg", "caption"] and batch.num_rows == 3


# ----------------------------------------------------------------------------- S3 (moto)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3(moto_endpoint, monkeypatch):
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"data-{_free_port()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def test_synth_and_inspect_on_s3(s3):
    client, bucket = s3
    stats = datasets.synth(f"s3://{bucket}/shapes", rows=12, image_size=16, rows_per_shard=5)
    assert stats["shards"] == 3
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        "shapes/_SUCCESS",
        "shapes/_manifest.json",
        "shapes/part-00000.parquet",
        "shapes/part-00001.parquet",
        "shapes/part-00002.parquet",
    ]
    body = client.get_object(Bucket=bucket, Key="shapes/part-00002.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).num_rows == 2
    info = datasets.inspect(f"s3://{bucket}/shapes")
    assert info["rows"] == 12 and info["bad_images"] == 0 and info["complete"]
    # dense scenes: classes.txt goes beside the shards on S3 and inspect reads it there
    datasets.synth(f"s3://{bucket}/dense", rows=3, image_size=16, objects=2, progress=False)
    body = client.get_object(Bucket=bucket, Key="dense/classes.txt")["Body"].read().decode()
    assert parse_classes(body) == ["background", *SHAPES]
    info = datasets.inspect(f"s3://{bucket}/dense")
    assert info["classes"] == ["background", *SHAPES] and info["masks_checked"] == 3
    with pytest.raises(UserError, match="^output: bucket 'no-such-bucket-here' does not exist"):
        datasets.synth("s3://no-such-bucket-here/x", rows=2, image_size=16)
    with pytest.raises(UserError) as e:
        datasets.inspect(f"s3://{bucket}/nothing-here")
    assert str(e.value) == f"dataset: no Parquet files at 's3://{bucket}/nothing-here'"


def test_cli_s3_endpoint_option(s3, monkeypatch, capsys):
    _, bucket = s3
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    argv = ["--endpoint-url", endpoint]
    assert main(["data", "synth", "--out", f"s3://{bucket}/cli", "--rows", "3", *argv]) == 0
    assert main(["data", "inspect", f"s3://{bucket}/cli", *argv]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "rows: 3"


# ----------------------------------------------------------------------------- CLI


def test_cli_synth_inspect_convert(tmp_path, image_folder, capsys):
    out = str(tmp_path / "shapes")
    argv = ["data", "synth", "--out", out, "--rows", "7", "--image-size", "16"]
    assert main([*argv, "--rows-per-shard", "3"]) == 0
    assert "wrote 7 rows in 3 shard(s)" in capsys.readouterr().out
    assert main(argv) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "inspect", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "rows: 7" and lines[0].startswith(f"dataset: {out}")

    d, captions = image_folder
    for name, (cap, _) in captions.items():
        (d / name).with_suffix(".txt").write_text(cap)
    conv = str(tmp_path / "conv")
    assert main(["data", "convert", "--images", str(d), "--out", conv, "--max-size", "32"]) == 0
    captured = capsys.readouterr()
    assert "wrote 4 rows" in captured.out and "broken.jpg" in captured.err


def test_cli_errors_are_one_line(capsys):
    assert main(["data", "inspect", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err == "error: dataset: no such file or directory '/nonexistent'\n"
    assert "Traceback" not in err
    assert main(["data", "convert", "--fashion-mnist", "--source", "/nope", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and err.count("\n") == 1
    assert main(["data", "convert", "--fashion-mnist", "--masks", "m", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: --masks/--classes are for --images; Fashion-MNIST masks come with --mosaic\n"
    )
    assert main(["data", "synth", "--out", "/tmp/x", "--rows", "2", "--objects", "9"]) == 2
    assert capsys.readouterr().err == "error: objects must be between 1 and 7 (got 9)\n"
    with pytest.raises(SystemExit) as e:  # argparse: --images and --fashion-mnist exclusive
        main(["data", "convert", "--images", "a", "--fashion-mnist", "--out", "o"])
    assert e.value.code == 2
