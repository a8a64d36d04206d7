"""Evaluation on features: zero-shot classification, retrieval recall@K, linear probe.

Everything but `encode_features` takes plain tensors (or arrays) of features; nothing here reads
data (the service's evaluation does, and feeds batches to `encode_features`).

    feats = encode_features(model, [{"image": x, "tokens": t}, ...])   # {"image": [N, D], ...}
    clf = zero_shot_classifier(model.encode_text, tok, class_names(), templates("shapes"))
    zero_shot_accuracy(image_features, clf, labels)     # {"top1": ..., "top5": ...}
    retrieval_recall(image_features, text_features)     # {"image_to_text_R1": ..., ...}
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
