"""Zero-shot prompt template sets: each template holds one `{}` for the class name.

    templates("default")            # a few generic "a photo of a {}." variants (as open_clip's)
    templates("fashion-mnist")      # the Fashion-MNIST caption templates, as prompts
    templates(["a {} shape."])      # an explicit list, checked

Plain Python (no torch): the service's spec validates `data.templates` with `check_templates`.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
)
"""Generic prompts in the style of open_clip's short template lists."""

SHAPES = (
    "a {} shape",
    "a small {} shape",
    "a large {} shape",
    "there is a {} shape",
    "a picture of a {} shape",
)
"""For `maskclip.synthetic` shapes, with either of its label columns as the class: a colour
("a red shape") or a shape name ("a circle shape")."""

FASHION_MNIST_CAPTIONS = (
    "a photo of {a} {c}",
    "a grey-scale picture of {a} {c}",
    "{a} {c} on a black background",
    "product photo: {c}",
    "a small black and white image of {a} {c}",
    "a low-resolution photo of the {c}",
    "a catalogue picture showing {a} {c}",
    "{c}, centred, on black",
    "this is {a} {c}",
    "a fashion item: {c}",
)
"""The caption templates `maskclip data convert --fashion-mnist` writes ({a}: article, {c}:
class name); the "fashion-mnist" prompt set is these with the class as `{}`."""

FASHION_MNIST = tuple(t.format(a="a", c="{}") for t in FASHION_MNIST_CAPTIONS)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "shapes": SHAPES,
    "fashion-mnist": FASHION_MNIST,
}


def check_template(template: str) -> str | None:
    """Why `template` is not a prompt template (exactly one `{}`, nothing else to fill), or None."""
    if not isinstance(template, str):
        return f"a template must be a string (got {type(template).__name__})"
    try:
        filled = template.format("x")
    except (IndexError, KeyError, ValueError):
        filled = None
    if template.count("{}") != 1 or filled is None or not template.strip():
        return "needs exactly one {} placeholder for the class name"
    return None


def check_templates(value: str | Sequence[str]) -> str | None:
    """Why `value` is neither a set name nor a non-empty list of templates, or None."""
    if isinstance(value, str):
        if value in TEMPLATE_SETS:
            return None
        return f"unknown template set; choose one of {', '.join(TEMPLATE_SETS)}"
    items = list(value)
    if not items:
        return "the template list is empty"
    for i, t in enumerate(items):
        why = check_template(t)
        if why:
            return f"template {i} {why}"
    return None


def templates(value: str | Sequence[str] = "default") -> list[str]:
    """A set name or an explicit list -> the list of templates; ValueError (one line) if bad."""
    why = check_templates(value)
    if why:
        raise ValueError(f"{why} (got {value!r})")
    return list(TEMPLATE_SETS[value] if isinstance(value, str) else value)
