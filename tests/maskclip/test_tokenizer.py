import pytest
import torch

from maskclip.synthetic import generate
from maskclip.tokenizer import Tokenizer

CAPTIONS = [r["caption"] for r in generate(200, image_size=8)] + [
    "Ein kleiner roter Kreis, links.",
    "un petit cercle rouge à gauche — très joli",
    "小さな赤い丸",
    "emoji 🙂 test",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=400, context_length=16)


def test_special_ids(tok):
    assert tok.pad_id == 0
    assert len(set(tok.special_ids)) == len(tok.special_ids) == 5
    assert {tok.pad_id, tok.sot_id, tok.eot_id, tok.mask_id} <= set(tok.special_ids)
    assert all(0 <= i < tok.vocab_size for i in tok.special_ids)
    assert 261 <= tok.vocab_size <= 400


def test_vocab_size_too_small():
    with pytest.raises(ValueError):
        Tokenizer.train(CAPTIONS, vocab_size=100)


def test_encode_layout(tok):
    ids = tok.encode(["a red circle", "a small blue square on the left"])
    assert ids.dtype == torch.long and ids.shape == (2, 16)
    for row in ids:
        n = int((row != tok.pad_id).sum())
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id
        assert (row[n:] == tok.pad_id).all()
        assert not torch.isin(row[1 : n - 1], torch.tensor(tok.special_ids)).any()
    assert tok.encode("a red circle").shape == (1, 16)


def test_empty_string(tok):
    ids = tok.encode("")[0]
    assert ids[:2].tolist() == [tok.sot_id, tok.eot_id]
    assert (ids[2:] == tok.pad_id).all()


def test_truncation_keeps_eot(tok):
    long = " ".join(["a large purple hexagon at the bottom"] * 20)
    ids = tok.encode([long])[0]
    assert (ids != tok.pad_id).all()
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id
    assert (ids == tok.eot_id).sum() == 1


def test_normalisation(tok):
    a = tok.encode("A   Red\tCircle\n")
    b = tok.encode("a red circle")
    assert torch.equal(a, b)


def test_special_token_text_is_not_special(tok):
    ids = tok.encode("a <eot> circle")[0]
    assert (ids == tok.eot_id).sum() == 1


def test_unicode_and_decode(tok):
    for text in [
        "un petit cercle rouge à gauche",
        "小さな赤い丸",
        "emoji 🙂 test",
        "ünseen wörds ß",
    ]:
        ids = tok.encode(text)[0]
        assert ids[0] == tok.sot_id and tok.eot_id in ids.tolist()
        if len(tok.encode(text)[0].nonzero()) < 16:  # not truncated
            assert tok.decode(ids) == text.lower()


def test_round_trip(tok, tmp_path):
    texts = CAPTIONS + ["something never seen: zebra 42!", "", "x" * 100]
    again = Tokenizer.from_json(tok.to_json())
    assert again.context_length == tok.context_length == 16
    assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids
    assert torch.equal(again.encode(texts), tok.encode(texts))
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert torch.equal(loaded.encode(texts), tok.encode(texts))
    assert loaded.to_json() == tok.to_json()


def test_context_length_saved(tmp_path):
    t = Tokenizer.train(CAPTIONS, vocab_size=300, context_length=5)
    t.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").encode("a b c d e f").shape == (1, 5)


def test_clip_tokenizer_gives_open_clip_ids_from_its_shipped_vocabulary():
    """model.tokenizer: clip — the standard CLIP BPE, built from the vocabulary file open_clip
    ships (no download), tokenizes exactly as open_clip's own tokenizer."""
    import open_clip

    tok = Tokenizer.clip(context_length=32)
    reference = open_clip.get_tokenizer("ViT-B-32")
    texts = [
        "a photo of a cat.",
        "A small RED circle on the left of a blue background",
        "T-shirt/top, ankle boot!!",
        "it's 42 o'clock — naïve café",
        "emoji 🙂 and 中文, tabs\tand\nnewlines",
    ]
    ours, theirs = tok.encode(texts), reference(texts)
    for i, text in enumerate(texts):
        mine = [t for t in ours[i].tolist() if t not in tok.special_ids]
        clip = [t for t in theirs[i].tolist() if t not in (0, 49406, 49407)]
        assert mine == clip, text
    assert tok.vocab_size == 49408 + 5  # CLIP's ids, then this class's special tokens
    assert tok.decode(ours[3]) == "it 's 4 2 o ' clock — naïve café"
    again = Tokenizer.from_json(tok.to_json())
    assert torch.equal(again.encode(texts), ours)
