import math

import numpy as np
import pytest
import torch

from maskclip.dense import IGNORE
from maskclip.evaluate import (
    confusion_matrix,
    dense_probe,
    encode_features,
    linear_probe,
    patch_pixels,
    patch_targets,
    retrieval_recall,
    segmentation_metrics,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_segmentation,
)
from maskclip.templates import FASHION_MNIST_CAPTIONS, TEMPLATE_SETS, check_templates, templates


class LookupTokenizer:
    """Each distinct text gets one id; encode returns [B, 1] ids."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, texts):
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])


def test_zero_shot_classifier_from_lookup_table():
    tok = LookupTokenizer()
    vectors = {
        "a cat.": [2.0, 0.0, 0.0],
        "the cat!": [0.0, 3.0, 0.0],
        "a dog.": [0.0, 0.0, 5.0],
        "the dog!": [0.0, 0.0, 0.5],
    }
    tok.encode(list(vectors))  # fix the ids
    table = torch.tensor(list(vectors.values()))
    calls = []

    def encode_text(ids):
        calls.append(torch.is_grad_enabled())
        return table[ids[:, 0]]

    clf = zero_shot_classifier(encode_text, tok, ["cat", "dog"], ["a {}.", "the {}!"])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(clf, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    assert calls and not any(calls)


def test_zero_shot_accuracy_known_ranks():
    c = 6
    feats = torch.tensor([5.0, 4, 3, 2, 1, 0]).repeat(c, 1)  # class 0 best, then 1, 2, ...
    labels = torch.arange(c)
    out = zero_shot_accuracy(7 * feats, torch.eye(c), labels, topk=(1, 2, 5, 10))
    assert out == pytest.approx({"top1": 1 / 6, "top2": 2 / 6, "top5": 5 / 6, "top10": 1.0})


def test_zero_shot_accuracy_perfect_and_wrong():
    clf = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    assert zero_shot_accuracy(torch.eye(4), clf, labels)["top1"] == 1.0
    assert zero_shot_accuracy(torch.eye(4), clf, labels.roll(1))["top1"] == 0.0
    assert zero_shot_accuracy(torch.eye(4), clf, labels.roll(1))["top5"] == 1.0


def test_retrieval_identity():
    out = retrieval_recall(torch.eye(8), 3 * torch.eye(8), ks=(1, 5, 10))
    assert set(out) == {f"{d}_R{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in out.values())


def test_retrieval_permutation():
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 7, 6, 9, 8])  # last four swapped in pairs
    out = retrieval_recall(torch.eye(10), torch.eye(10)[perm], ks=(1, 5, 10))
    for d in ("image_to_text", "text_to_image"):
        assert out[f"{d}_R1"] == pytest.approx(0.6)
        assert out[f"{d}_R5"] == pytest.approx(0.6)  # zero-similarity ties count against
        assert out[f"{d}_R10"] == 1.0


def test_retrieval_shifted_pairs():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(20, 512, generator=g)
    txt = img.roll(-1, dims=0)  # text i is image i+1: the true pair is never the best match
    out = retrieval_recall(img, txt, ks=(1, 20))
    assert out["image_to_text_R1"] == 0.0 and out["text_to_image_R1"] == 0.0
    assert out["image_to_text_R20"] == 1.0


def test_retrieval_asymmetric():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.01]])
    out = retrieval_recall(img, txt, ks=(1, 2))
    assert out["image_to_text_R1"] == 1.0
    assert out["text_to_image_R1"] == pytest.approx(2 / 3)
    assert out["text_to_image_R2"] == 1.0


def test_retrieval_needs_pairs():
    with pytest.raises(ValueError):
        retrieval_recall(torch.eye(3), torch.eye(4)[:, :3])


def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 10
    y_train, y_test = rng.integers(0, 3, 150), rng.integers(0, 3, 60)
    x_train = centres[y_train] + rng.normal(0, 0.5, (150, 8))
    x_test = centres[y_test] + rng.normal(0, 0.5, (60, 8))
    out = linear_probe(torch.tensor(x_train), torch.tensor(y_train), x_test, y_test)
    assert out == {"top1": 1.0}
    noise = linear_probe(rng.normal(size=(150, 8)), y_train, rng.normal(size=(60, 8)), y_test)
    assert noise["top1"] < 0.7


def test_confusion_matrix():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(pred, labels, 4)
    expected = np.zeros((4, 4), np.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert np.array_equal(cm, expected)
    assert cm.shape == (4, 4) and cm.sum() == 6 and np.trace(cm) == 3
    with pytest.raises(ValueError):
        confusion_matrix([0, 4], [0, 1], 4)


def test_retrieval_caption_ids_all_distinct_agree():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    plain = retrieval_recall(img, txt, ks=(1, 3, 12))
    grouped = retrieval_recall(img, txt, ks=(1, 3, 12), caption_ids=list(range(12)))
    assert grouped == pytest.approx(plain)


def test_retrieval_duplicate_captions_are_one_candidate():
    # 6 images of 3 classes, captions are the class name: texts of one class are identical.
    cls = torch.tensor([0, 0, 1, 1, 2, 2])
    img = torch.eye(3)[cls] + 0.01 * torch.arange(6.0)[:, None]  # images near their class axis
    txt = torch.eye(3)[cls]
    plain = retrieval_recall(img, txt, ks=(1,))
    assert plain["image_to_text_R1"] == 0.0  # the duplicate caption ties and counts against
    grouped = retrieval_recall(img, txt, ks=(1, 2), caption_ids=cls)
    assert grouped["image_to_text_R1"] == 1.0
    assert grouped["text_to_image_R1"] == 1.0  # any image of the caption is a hit
    # Swap the images of class 1 and 2: every class-1/2 query now misses at rank 1.
    swapped = retrieval_recall(img[[0, 1, 4, 5, 2, 3]], txt, ks=(1, 3), caption_ids=cls)
    assert swapped["image_to_text_R1"] == pytest.approx(2 / 6)
    assert swapped["text_to_image_R1"] == pytest.approx(2 / 6)
    assert swapped["image_to_text_R3"] == 1.0  # only 3 distinct captions to rank


def test_retrieval_caption_ids_length_checked():
    with pytest.raises(ValueError, match="caption id"):
        retrieval_recall(torch.eye(3), torch.eye(3), caption_ids=[0, 1])


class _Towers(torch.nn.Module):
    """encode_image sums pixels per channel, encode_text embeds the first token."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(10, 3)

    def encode_image(self, x):
        return x.sum(dim=(2, 3))

    def encode_text(self, tokens):
        return self.table(tokens[:, 0])


def test_encode_features_concatenates_in_order_without_grad():
    model = _Towers()
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).view(5, 3, 2, 2)
    tokens = torch.tensor([[1], [2], [3], [4], [5]])
    batches = [
        {"image": images[:2], "tokens": tokens[:2]},
        {"image": images[2:]},
        {"tokens": tokens[2:]},
    ]
    out = encode_features(model, batches)
    torch.testing.assert_close(out["image"], images.sum(dim=(2, 3)))
    torch.testing.assert_close(out["text"], model.table(tokens[:, 0]).detach())
    assert out["image"].dtype == torch.float32 and not out["text"].requires_grad
    assert encode_features(model, [{"image": images}])["text"] is None
    assert encode_features(model, []) == {"image": None, "text": None}


def test_template_sets_and_checks():
    for name, expected in TEMPLATE_SETS.items():
        got = templates(name)
        assert got == list(expected) and got and all(t.count("{}") == 1 for t in got), name
    assert templates(["a {} here"]) == ["a {} here"]
    # the Fashion-MNIST prompts are its caption templates with the class as {}
    assert "a photo of a {}" in templates("fashion-mnist")
    assert len(templates("fashion-mnist")) == len(FASHION_MNIST_CAPTIONS)
    for bad, message in (
        ("nope", "unknown template set; choose one of default, shapes, fashion-mnist"),
        ([], "the template list is empty"),
        (["a {} {}"], "template 0 needs exactly one {} placeholder"),
        (["ok {}", "{0} {}"], "template 1 needs exactly one {} placeholder"),
        (["{x} {}"], "template 0 needs exactly one {} placeholder"),
    ):
        assert check_templates(bad) is not None and check_templates(bad).startswith(message), bad
        with pytest.raises(ValueError, match="got"):
            templates(bad)


# ---------------------------------------------------------------- dense evaluation


def test_segmentation_metrics_by_hand():
    """Ignored pixels leave both metrics; mIoU averages the classes in GT or prediction only."""
    target = torch.tensor([[0, 0, 1], [1, IGNORE, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])  # the 0 under IGNORE counts nowhere
    out = segmentation_metrics(pred, target, num_classes=4)
    # confusion (rows true): 0 -> {0: 1, 1: 1}; 1 -> {1: 2}; 2 -> {0: 1}; class 3 absent
    # IoU: 0 = 1 / (2 + 2 - 1), 1 = 2 / (2 + 3 - 2), 2 = 0 / 1
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert out["pixel_accuracy"] == pytest.approx(3 / 5)
    assert out["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(out["iou"][3])
    perfect = segmentation_metrics(target.clamp(max=2), target, 3)
    assert perfect["miou"] == 1.0 and perfect["pixel_accuracy"] == 1.0
    nothing = segmentation_metrics(pred, torch.full((2, 3), IGNORE), 3)
    assert nothing["miou"] == 0.0 and nothing["pixel_accuracy"] == 0.0


def test_patch_targets_majority_ties_and_unlabelled():
    m = torch.tensor(
        [
            [
                [0, 0, 1, 1],
                [1, IGNORE, 2, 2],
                [IGNORE, IGNORE, 2, IGNORE],
                [IGNORE, IGNORE, IGNORE, IGNORE],
            ]
        ],
        dtype=torch.uint8,
    )
    # 2x2 patches: {0,0,1,ignore} -> 0; {1,1,2,2} tie -> 1 (lowest); all ignore; {2} -> 2
    assert patch_targets(m, (2, 2), 3).tolist() == [[[0, 1], [IGNORE, 2]]]
    with pytest.raises(ValueError, match="patch grid"):
        patch_targets(m, (3, 3), 3)


def test_patch_pixels_follow_the_vit_grid():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patch_pixels(x, 2)
    assert p.shape == (2, 2, 3, 12)
    assert torch.equal(p[1, 1, 2], x[1, :, 2:4, 4:6].reshape(-1))


def _patch_masks(classes: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, gh, gw] patch classes -> [N, gh*p, gw*p] pixel masks, constant on each patch."""
    return classes.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)


def _tokens(n: int, seed: int, noise: float, signal: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 3, (n, 4, 4), generator=g)
    centres = torch.eye(3, 8) * signal
    return centres[cls] + noise * torch.randn(n, 4, 4, 8, generator=g), _patch_masks(cls, 4)


def test_dense_probe_separable_tokens_and_noise():
    """Tokens that carry the class (class centre + noise) give a high per-pixel mIoU (not 1: the
    bilinear upsampling of the scores rounds the corners of patches whose neighbours share
    another class, on these random patch-by-patch labels); tokens that carry nothing give about
    chance."""
    tr, mtr = _tokens(40, 0, noise=0.3)
    te, mte = _tokens(20, 1, noise=0.3)
    mte[0, :2, :] = IGNORE  # ignored pixels are left out, not counted wrong
    out = dense_probe(tr, mtr, te, mte, num_classes=3, keep=2)
    assert out["miou"] > 0.85 and out["pixel_accuracy"] > 0.9, out["miou"]
    assert out["train_patches"] == 40 * 16
    assert out["pred"].shape == (2, 16, 16) and out["pred"].dtype == torch.uint8
    assert out["confusion_matrix"].sum() == 20 * 256 - 2 * 16
    noise, _ = _tokens(40, 0, noise=1.0, signal=0.0)
    chance = dense_probe(noise, mtr, _tokens(20, 1, 1.0, 0.0)[0], mte, num_classes=3)
    assert chance["miou"] < 0.45, chance["miou"]
    # the same rows give the same fit (L-BFGS from zero weights: nothing random)
    again = dense_probe(tr, mtr, te, mte, num_classes=3, keep=2)
    assert again["miou"] == out["miou"] and torch.equal(again["pred"], out["pred"])


def test_zero_shot_segmentation_exact():
    """One image of two 4x4 patches: the left patch's token is class 0's embedding, the right
    one's is class 1's while its pixels are class 2. Bilinear upsampling keeps each pixel with
    its own patch (weight >= 5/8), so: class 0 all right, class 2 all predicted 1."""
    emb = torch.eye(3, 5) * 2.0  # normalised inside
    tokens = torch.zeros(1, 1, 2, 5)
    tokens[0, 0, 0, 0] = 0.7
    tokens[0, 0, 1, 1] = 1.3
    target = torch.zeros(1, 4, 8, dtype=torch.uint8)
    target[0, :, 4:] = 2
    target[0, 0, 0] = IGNORE
    out = zero_shot_segmentation(tokens, emb, target)
    assert out["pred"][0].tolist() == [[0] * 4 + [1] * 4] * 4
    assert out["pixel_accuracy"] == pytest.approx(15 / 31)
    assert out["iou"] == pytest.approx([1.0, 0.0, 0.0])
    assert out["miou"] == pytest.approx(1 / 3)
    assert out["confusion_matrix"].tolist() == [[15, 0, 0], [0, 0, 0], [0, 16, 0]]
