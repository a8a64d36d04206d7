"""Evaluation on features: zero-shot classification, retrieval recall@K, linear probe, and
dense (per-pixel) evaluation on patch tokens: a dense linear probe and zero-shot segmentation.

Everything but `encode_features` takes plain tensors (or arrays) of features; nothing here reads
data (the service's evaluation does, and feeds batches to `encode_features`).

    feats = encode_features(model, [{"image": x, "tokens": t}, ...])   # {"image": [N, D], ...}
    clf = zero_shot_classifier(model.encode_text, tok, class_names(), templates("shapes"))
    zero_shot_accuracy(image_features, clf, labels)     # {"top1": ..., "top5": ...}
    retrieval_recall(image_features, text_features)     # {"image_to_text_R1": ..., ...}
    tokens = model.encode_patches(images)               # [N, gh, gw, width]
    dense_probe(train_tokens, train_masks, test_tokens, test_masks, C)   # {"miou", ...}
    zero_shot_segmentation(model.project_patches(tokens), clf, masks)    # {"miou", ...}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class _Encodes(Protocol):
    def encode(self, texts: list[str]) -> torch.Tensor: ...


def _tensor(x) -> torch.Tensor:
    return x.detach().float().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x).float()


@torch.no_grad()
def encode_features(
    model, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str | None = None
) -> dict[str, torch.Tensor | None]:
    """Encode batches of {"image": [B, 3, H, W]} and/or {"tokens": [B, L]} with the model's
    `encode_image` / `encode_text` -> {"image": [N, D] | None, "text": [N, D] | None}, float32
    on the CPU, in batch order (None where no batch had that key). Gradients off; the caller
    puts the model in eval mode."""
    out: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
    for batch in batches:
        if "image" in batch:
            x = batch["image"] if device is None else batch["image"].to(device)
            out["image"].append(model.encode_image(x).float().cpu())
        if "tokens" in batch:
            t = batch["tokens"] if device is None else batch["tokens"].to(device)
            out["text"].append(model.encode_text(t).float().cpu())
    return {k: torch.cat(v) if v else None for k, v in out.items()}


@torch.no_grad()
def zero_shot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: _Encodes,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[C, D] class embeddings: the mean of normalised template embeddings, renormalised."""
    rows = []
    for name in class_names:
        tokens = tokenizer.encode([t.format(name) for t in templates])
        if device is not None:
            tokens = tokens.to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1).mean(dim=0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(
    image_features: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of cosine-similarity classification; k is clipped to the class count."""
    img = F.normalize(_tensor(image_features), dim=-1)
    clf = F.normalize(_tensor(classifier).to(img.device), dim=-1)
    labels = torch.as_tensor(labels).long().cpu()
    logits = img @ clf.T
    kmax = min(max(topk), logits.shape[1])
    hits = logits.topk(kmax, dim=1).indices == labels[:, None]  # [N, kmax]
    return {f"top{k}": hits[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in topk}


def _ranks(sim: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of the diagonal entry in each row; ties count against it."""
    diag = sim.diagonal()[:, None]
    return (sim >= diag).sum(dim=1) - 1


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    caption_ids: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@K both ways over N image-caption pairs; k is clipped to the candidates.

    Without `caption_ids`, pair i <-> i is the only match and ties count against it. With
    `caption_ids` (one int per pair, equal for identical captions, as in template-captioned data
    where hundreds of images share one caption string) matches are COCO-style: image->text ranks
    the distinct captions and hits when the image's own caption is in the top K; text->image
    hits when any image carrying that caption is in the top K (averaged over the N captions).
    With all captions distinct both forms agree.
    """
    img = F.normalize(_tensor(image_features), dim=-1)
    txt = F.normalize(_tensor(text_features), dim=-1)
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"need paired features, got {img.shape[0]} images, {txt.shape[0]} texts")
    n = img.shape[0]
    if caption_ids is None:
        sim = img @ txt.T
        i2t, t2i, n_txt = _ranks(sim), _ranks(sim.T), n
    else:
        ids = torch.as_tensor(caption_ids).reshape(-1)
        if ids.shape[0] != n:
            raise ValueError(f"need one caption id per pair, got {ids.shape[0]} for {n} pairs")
        _, group = torch.unique(ids, return_inverse=True)  # [N] in 0..U-1
        n_txt = int(group.max()) + 1
        first = torch.full((n_txt,), n, dtype=torch.long)
        first.scatter_reduce_(0, group, torch.arange(n), reduce="amin")
        sim = img @ txt[first].T  # [N images, U distinct captions]
        own = sim.gather(1, group[:, None])
        i2t = (sim >= own).sum(dim=1) - 1
        positive = group[None, :] == torch.arange(n_txt)[:, None]  # [U, N]
        sim_t = sim.T
        best = sim_t.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        rank_u = (sim_t.masked_fill(positive, float("-inf")) >= best).sum(dim=1)
        t2i = rank_u[group]
    out = {}
    for name, ranks, candidates in (("image_to_text", i2t, n_txt), ("text_to_image", t2i, n)):
        for k in ks:
            out[f"{name}_R{k}"] = (ranks < min(k, candidates)).float().mean().item()
    return out


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Logistic regression on standardised features; returns test top-1 accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def arr(x) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(arr(train_features), arr(train_labels))
    pred = clf.predict(arr(test_features))
    return {"top1": float((pred == arr(test_labels)).mean())}


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; rows are true labels, columns predictions."""
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred, dtype=np.int64)
    t = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if p.shape != t.shape or (
        p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes)
    ):
        raise ValueError("pred and labels must have one shape and values in [0, num_classes)")
    flat = np.bincount(t.ravel() * num_classes + p.ravel(), minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


# ---------------------------------------------------------------- dense (per-pixel) evaluation
#
# Masks are [N, H, W] integer class indices at the evaluated image resolution (maskclip.dense:
# IGNORE = 255 = not labelled); patch tokens are [N, gh, gw, D] on the model's patch grid
# (`MaskCLIP.encode_patches`). Predictions are made per patch and upsampled to pixels bilinearly
# on the class scores (logits), then argmax; metrics count labelled pixels only.


def segmentation_confusion(pred, target, num_classes: int) -> np.ndarray:
    """`confusion_matrix` over the labelled pixels only (target != IGNORE): rows true class,
    columns predicted. Target values other than IGNORE must be < num_classes."""
    from .dense import IGNORE

    p = torch.as_tensor(pred).reshape(-1)
    t = torch.as_tensor(target).reshape(-1)
    keep = t != IGNORE
    return confusion_matrix(p[keep], t[keep], num_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict:
    """{"miou", "pixel_accuracy", "iou"} from a pixel confusion matrix. A class's IoU is
    TP / (TP + FP + FN); mIoU averages over the classes present in the ground truth or the
    prediction (union > 0); "iou" lists every class's IoU (NaN where absent from both). With no
    labelled pixel at all both metrics are 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    iou = np.full(cm.shape[0], np.nan)
    present = union > 0
    iou[present] = tp[present] / union[present]
    total = cm.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "iou": iou.tolist(),
    }


def segmentation_metrics(pred, target, num_classes: int) -> dict:
    """mIoU and pixel accuracy of predicted class maps against target masks (same shape, any
    leading dims); IGNORE pixels of the target are left out. See `metrics_from_confusion`."""
    return metrics_from_confusion(segmentation_confusion(pred, target, num_classes))


def patch_targets(masks, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """[N, H, W] pixel masks -> [N, gh, gw] long: each patch's majority labelled class (ties: the
    lowest index), IGNORE where the patch has no labelled pixel. H and W must be multiples of
    the grid."""
    from .dense import IGNORE

    m = torch.as_tensor(masks).long()
    n, h, w = m.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"a {h}x{w} mask does not split into a {gh}x{gw} patch grid")
    c1 = num_classes + 1
    lab = torch.where(m == IGNORE, torch.tensor(num_classes), m)
    if lab.numel() and int(lab.max()) > num_classes:
        raise ValueError(f"mask values must be < {num_classes} or {IGNORE}")
    rows = torch.arange(h) // (h // gh)
    cols = torch.arange(w) // (w // gw)
    pid = (torch.arange(n)[:, None, None] * gh + rows[None, :, None]) * gw + cols[None, None, :]
    counts = torch.bincount((pid * c1 + lab).reshape(-1), minlength=n * gh * gw * c1)
    counts = counts.view(n, gh, gw, c1)[..., :num_classes]
    out = counts.argmax(dim=-1)
    out[counts.sum(dim=-1) == 0] = IGNORE
    return out


def patch_pixels(images, patch_size: int) -> torch.Tensor:
    """[N, 3, H, W] images -> [N, gh, gw, 3 * p * p]: each patch's pixels, flattened (the
    raw-pixel baseline's "tokens", on the same grid as a ViT with this patch size)."""
    x = _tensor(images)
    n, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"a {h}x{w} image does not split into {p}x{p} patches")
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, h // p, w // p, c * p * p)


def _upsampled_predictions(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    masks,
    num_classes: int,
    chunk: int,
    keep: int,
) -> dict:
    """Per-patch class scores ([n, gh, gw, C] from `logits_fn(tokens[i:j])`) upsampled
    bilinearly to the masks' size, argmax per pixel, confusion accumulated chunk by chunk.
    Returns the metrics plus the confusion matrix and the first `keep` predicted masks."""
    masks = torch.as_tensor(masks)
    if tokens.shape[0] != masks.shape[0]:
        raise ValueError(f"{tokens.shape[0]} token maps but {masks.shape[0]} masks")
    size = tuple(masks.shape[-2:])
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    kept: list[torch.Tensor] = []
    for i in range(0, tokens.shape[0], chunk):
        logits = logits_fn(tokens[i : i + chunk]).permute(0, 3, 1, 2)  # [n, C, gh, gw]
        up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        pred = up.argmax(dim=1)
        cm += segmentation_confusion(pred, masks[i : i + chunk], num_classes)
        if sum(len(k) for k in kept) < keep:
            kept.append(pred[: keep - sum(len(k) for k in kept)].to(torch.uint8))
    out = metrics_from_confusion(cm)
    out["confusion_matrix"] = cm
    out["pred"] = torch.cat(kept) if kept else torch.zeros((0, *size), dtype=torch.uint8)
    return out


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression on standardised features, fitted full-batch with L-BFGS
    (strong-Wolfe line search) from zero weights: no randomness, the same fit every time on the
    same rows. x: [M, D], y: [M] in 0..C-1. Returns f(features [..., D]) -> logits [..., C]."""
    x = _tensor(x)
    y = torch.as_tensor(y).long()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp(min=1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-6,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: ((_tensor(f) - mean) / std) @ w + b


def dense_probe(
    train_tokens,
    train_masks,
    test_tokens,
    test_masks,
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    chunk: int = 64,
    keep: int = 4,
) -> dict:
    """Linear probe on frozen patch tokens, evaluated per pixel.

    train_tokens / test_tokens: [N, gh, gw, D] (patch tokens, or any per-patch features such as
    `patch_pixels`); train_masks / test_masks: [N, H, W] class indices (IGNORE = 255) at image
    resolution, H and W multiples of the grid. Each training patch's target is the majority
    labelled class of its pixels (patches with no labelled pixel are left out); the classifier
    is `fit_linear` (multinomial logistic regression, L-BFGS, standardised features, weight
    decay `weight_decay`). Test patches' class scores are upsampled bilinearly to pixels, argmax.

    Returns {"miou", "pixel_accuracy", "iou" (per class, NaN where absent), "confusion_matrix",
    "pred" (the first `keep` test predictions, [keep, H, W] uint8), "train_patches"}.
    """
    from .dense import IGNORE

    tr = _tensor(train_tokens)
    te = _tensor(test_tokens)
    if tr.ndim != 4 or te.ndim != 4 or tr.shape[-1] != te.shape[-1]:
        raise ValueError("tokens must be [N, gh, gw, D], with one D for train and test")
    y = patch_targets(train_masks, tuple(tr.shape[1:3]), num_classes).reshape(-1)
    x = tr.reshape(-1, tr.shape[-1])
    labelled = y != IGNORE
    x, y = x[labelled], y[labelled]
    if x.shape[0] == 0:
        raise ValueError("no training patch has a labelled pixel")
    predict = fit_linear(x, y, num_classes, weight_decay, max_iter)
    out = _upsampled_predictions(predict, te, test_masks, num_classes, chunk, keep)
    out["train_patches"] = int(x.shape[0])
    return out


def zero_shot_segmentation(
    projected_tokens, class_embeddings, masks, *, chunk: int = 64, keep: int = 4
) -> dict:
    """Each patch's class is the prompt embedding it is most similar to (cosine): projected
    patch tokens [N, gh, gw, D] (`encode_patches(..., project=True)`) against class embeddings
    [C, D] (`zero_shot_classifier`, the same templates as zero-shot classification); the
    similarities are upsampled bilinearly to the masks' [N, H, W] size, argmax per pixel.
    Returns the same keys as `dense_probe` (without "train_patches")."""
    clf = F.normalize(_tensor(class_embeddings), dim=-1)
    tokens = _tensor(projected_tokens)
    return _upsampled_predictions(
        lambda t: F.normalize(t, dim=-1) @ clf.T, tokens, masks, clf.shape[0], chunk, keep
    )
