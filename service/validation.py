"""Periodic validation inside the training loop and the end-of-run figure.

Zero-shot over the validation set's own class names (its label column) and image<->text
retrieval R@K on its pairs, using `maskclip.evaluate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskclip.evaluate import retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from maskclip.synthetic import prompt_templates


@torch.no_grad()
def encode_dataset(model, batches, device, max_rows: int = 2000):
    imgs, txts, tokens, labels = [], [], [], []
    n = 0
    for batch in batches:
        imgs.append(model.encode_image(batch["image"].to(device)).float().cpu())
        txts.append(model.encode_text(batch["tokens"].to(device)).float().cpu())
        tokens.append(batch["tokens"].cpu())
        if "label" in batch:
            labels.extend(str(x) for x in batch["label"])
        n += len(batch["image"])
        if n >= max_rows:
            break
    if not imgs:
        return None, None, None, []
    # Identical token rows are identical captions: retrieval counts any of them as a match.
    _, caption_ids = torch.unique(torch.cat(tokens), dim=0, return_inverse=True)
    return torch.cat(imgs), torch.cat(txts), caption_ids, labels


def validate(model, tokenizer, val_shard, device, max_rows: int = 2000) -> dict[str, float]:
    batches = (
        {k: torch.from_numpy(v) if k in ("image", "tokens") else v for k, v in b.items()}
        for b in val_shard.iter_batches(batch_size=128, batch_format="numpy")
    )
    img, txt, caption_ids, labels = encode_dataset(model, batches, device, max_rows)
    if img is None:
        return {}
    recall = retrieval_recall(img, txt, caption_ids=caption_ids)
    metrics = {f"val_{k}": v for k, v in recall.items()}
    if labels:
        names = sorted(set(labels))
        index = {c: i for i, c in enumerate(names)}
        clf = zero_shot_classifier(
            lambda t: model.encode_text(t.to(device)).float().cpu(),
            tokenizer,
            names,
            prompt_templates(),
        )
        acc = zero_shot_accuracy(img, clf, torch.tensor([index[c] for c in labels]))
        metrics.update({f"val_zero_shot_{k}": v for k, v in acc.items()})
    return metrics


@torch.no_grad()
def patch_similarity_figure(task, images: torch.Tensor, path: str) -> None:
    """A few images, their masks, and the cosine similarity between the student's predicted
    patch features and the EMA teacher's, per patch (masked positions only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskclip.masking import patch_mask
    from maskclip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    student = task.student
    d = task.cfg.distill
    n = images.shape[0]
    gh, gw = student.visual.grid
    mask = patch_mask(d.masking, n, (gh, gw), d.mask_ratio, torch.Generator().manual_seed(0))
    mask = mask.to(images.device)
    sim = torch.full((n, gh * gw), float("nan"))
    if d.image_enabled and task.teacher is not None:
        enc = student.visual.tokens(images, mask, visible_only=d.mode == "efficient")
        pred = student.image_decoder(enc, mask)
        target = task.teacher["visual"].tokens(images)[:, 1:][mask]
        sim[mask.cpu()] = F.cosine_similarity(pred, target, dim=-1).float().cpu()
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    fig, axes = plt.subplots(n, 3, figsize=(7, 2.3 * n), squeeze=False)
    for i in range(n):
        img = (images[i].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[i][0].imshow(img)
        axes[i][1].imshow(img)
        axes[i][1].imshow(
            mask[i].cpu().view(gh, gw).numpy(),
            alpha=0.6,
            cmap="gray",
            extent=(0, img.shape[1], img.shape[0], 0),
        )
        im = axes[i][2].imshow(sim[i].view(gh, gw).numpy(), vmin=-1, vmax=1, cmap="viridis")
        for ax in axes[i]:
            ax.axis("off")
    axes[0][0].set_title("image")
    axes[0][1].set_title("student mask")
    axes[0][2].set_title("student-teacher cos")
    fig.colorbar(im, ax=[row[2] for row in axes], shrink=0.6)
    fig.savefig(path, dpi=80)
    plt.close(fig)
