"""The product's figures (matplotlib, Agg backend): the zero-shot confusion matrix and the dense
evaluation examples (image, ground truth, each prediction) that `maskclip eval` logs, and the
end-of-run mask / student-teacher similarity figure."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confusion_figure(class_names: list[str], matrix, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix)
    n = len(class_names)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion matrix")
    if n <= 20:
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black",
                )
    fig.colorbar(im, ax=ax, shrink=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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


def segmentation_figure(
    images: torch.Tensor,
    target: torch.Tensor,
    preds: dict[str, torch.Tensor],
    class_names: list[str],
    path: str,
    title: str = "",
) -> None:
    """Dense evaluation examples: one row per test image (CLIP-normalised [k, 3, H, W]) with its
    ground-truth mask and each prediction (`preds`: name -> [k, H, W] class indices), coloured by
    class (IGNORE pixels black), with a legend of the classes that appear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from maskclip.dense import IGNORE
    from maskclip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    n = images.shape[0]
    c = len(class_names)
    base = plt.get_cmap("tab20" if c > 10 else "tab10")
    colours = [base(i % base.N) for i in range(c)] + [(0.0, 0.0, 0.0, 1.0)]
    cmap = ListedColormap(colours)

    def coloured(m: torch.Tensor) -> np.ndarray:
        a = m.cpu().numpy().astype(np.int64)
        return np.where(a == IGNORE, c, np.clip(a, 0, c - 1))

    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    columns = ["image", "ground truth", *preds]
    fig, axes = plt.subplots(
        max(n, 1), len(columns), figsize=(2.2 * len(columns), 2.2 * max(n, 1) + 0.8), squeeze=False
    )
    seen: set[int] = set()
    for i in range(n):
        img = (images[i].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[i][0].imshow(img)
        maps = [coloured(target[i]), *(coloured(p[i]) for p in preds.values())]
        for j, m in enumerate(maps, start=1):
            axes[i][j].imshow(m, cmap=cmap, vmin=0, vmax=c, interpolation="nearest")
            seen.update(int(v) for v in np.unique(m) if v < c)
    for j, name in enumerate(columns):
        axes[0][j].set_title(name, fontsize=9)
    for row in axes:
        for ax in row:
            ax.axis("off")
    handles = [Patch(color=colours[k], label=class_names[k]) for k in sorted(seen)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
