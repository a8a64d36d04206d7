import pytest
import torch

from maskclip.masking import block_mask, num_masked, patch_mask, random_mask, text_mask


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize(
    "grid,ratio", [((8, 8), 0.75), ((14, 14), 0.75), ((4, 4), 0.5), ((8, 8), 0.3)]
)
def test_exact_count_per_row(kind, grid, ratio):
    mask = patch_mask(kind, 16, grid, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (16, grid[0] * grid[1]) and mask.dtype == torch.bool
    assert (mask.sum(1) == num_masked(grid[0] * grid[1], ratio)).all()


@pytest.mark.parametrize("kind", ["block", "random"])
def test_reproducible_from_seed(kind):
    a = patch_mask(kind, 8, (8, 8), 0.75, torch.Generator().manual_seed(3))
    b = patch_mask(kind, 8, (8, 8), 0.75, torch.Generator().manual_seed(3))
    c = patch_mask(kind, 8, (8, 8), 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_masks_are_spatially_clustered():
    """Block masks put masked patches next to each other far more than random masks do."""

    def neighbours(mask):
        m = mask.view(-1, 14, 14).float()
        return ((m[:, 1:, :] * m[:, :-1, :]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()).item()

    g = torch.Generator().manual_seed(0)
    block = block_mask(32, (14, 14), 0.4, g)
    rand = random_mask(32, 196, 0.4, g)
    assert neighbours(block) > 1.3 * neighbours(rand)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown masking kind"):
        patch_mask("zigzag", 1, (4, 4), 0.5)


def test_text_mask_skips_special_tokens_and_counts():
    pad, sot, eot, mask_id = 0, 1, 2, 3
    tokens = torch.tensor(
        [
            [sot] + list(range(10, 30)) + [eot] + [pad] * 10,
            [sot, 40, 41, eot] + [pad] * 28,
            [sot, eot] + [pad] * 30,
        ]
    )
    masked, mask = text_mask(
        tokens, 0.15, (pad, sot, eot), mask_id, torch.Generator().manual_seed(0)
    )
    assert mask.sum(1).tolist() == [3, 1, 0]  # round(0.15*20)=3, at least 1, none without content
    assert (masked[mask] == mask_id).all()
    assert torch.equal(masked[~mask], tokens[~mask])
    special = (tokens == pad) | (tokens == sot) | (tokens == eot)
    assert not (mask & special).any()
