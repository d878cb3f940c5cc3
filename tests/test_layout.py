"""TokenLayout on hand-built prompts: exact spans for left/right padding, clear errors otherwise."""
from __future__ import annotations

import pytest
import torch

from vlm.layout import LayoutError, TokenLayout

I, P = 7, 0  # image token id, pad id


def test_left_padding_spans_exact():
    input_ids = torch.tensor([
        [P, P, 1, 2, I, I, I, 4, 5, 6],
        [1, 2, 3, I, I, I, 4, 5, 6, 8],
    ])
    mask = (input_ids != P).long()
    lay = TokenLayout.from_batch(input_ids, mask, I, tokens_per_image=3)
    assert lay.vision_index.tolist() == [[4, 5, 6], [3, 4, 5]]
    assert lay.vision_spans == [[(4, 7)], [(3, 6)]]
    assert lay.text_index.tolist() == [[7, 8, 9, 9], [6, 7, 8, 9]]
    assert lay.text_mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert lay.system_index.tolist() == [[2, 3, 2], [0, 1, 2]]
    assert lay.system_mask.tolist() == [[True, True, False], [True, True, True]]
    assert lay.last_index.tolist() == [9, 9]
    assert lay.num_vision == 3


def test_right_padding_spans_exact():
    input_ids = torch.tensor([
        [1, I, I, 4, 5, P, P],
        [1, 2, I, I, 4, 5, 6],
    ])
    lay = TokenLayout.from_batch(input_ids, (input_ids != P).long(), I)
    assert lay.vision_index.tolist() == [[1, 2], [2, 3]]
    assert lay.text_index.tolist() == [[3, 4, 4], [4, 5, 6]]
    assert lay.text_mask.tolist() == [[True, True, False], [True, True, True]]
    assert lay.last_index.tolist() == [4, 6]


def test_no_mask_means_no_padding_and_several_spans():
    input_ids = torch.tensor([[1, I, I, 9, I, I, 4, 5]])
    lay = TokenLayout.from_batch(input_ids, None, I)
    assert lay.vision_spans == [[(1, 3), (4, 6)]]
    assert lay.vision_index.tolist() == [[1, 2, 4, 5]]
    assert lay.text_index.tolist() == [[6, 7]]  # text = after the last vision span


def test_prompt_without_image_tokens_is_a_clear_error():
    with pytest.raises(LayoutError, match="row 1 has no image token"):
        TokenLayout.from_batch(torch.tensor([[1, I, 3], [1, 2, 3]]), None, I)


def test_image_token_count_not_matching_features_is_a_clear_error():
    with pytest.raises(LayoutError, match="575 image tokens, not a multiple of the 576"):
        TokenLayout.from_batch(torch.tensor([[1] + [I] * 575 + [3]]), None, I, tokens_per_image=576)


def test_rows_with_no_text_is_a_clear_error():
    with pytest.raises(LayoutError, match="no text token after"):
        TokenLayout.from_batch(torch.tensor([[1, 2, I, I]]), None, I)


def test_rows_with_different_vision_counts_are_padded_and_masked():
    """Images of different sizes: each row's vision positions first, its last one as filler, a mask and the counts;
    the text, system and last-token fields are each row's own, as if the row were laid out alone."""
    input_ids = torch.tensor([
        [P, P, 1, I, I, 4, 5, 6],
        [1, I, I, I, I, 9, 5, 6],
        [P, 1, I, I, I, 4, 5, 6],
    ])
    mask = (input_ids != P).long()
    lay = TokenLayout.from_batch(input_ids, mask, I, tokens_per_image=1)
    assert lay.ragged and lay.vision_counts == (2, 4, 3) and lay.max_vision == 4
    assert lay.vision_index.tolist() == [[3, 4, 4, 4], [1, 2, 3, 4], [2, 3, 4, 4]]
    assert lay.vision_valid.tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    assert lay.vision_valid_mask() is lay.vision_valid
    assert lay.vision_spans == [[(3, 5)], [(1, 5)], [(2, 5)]]
    assert lay.text_index.tolist() == [[5, 6, 7], [5, 6, 7], [5, 6, 7]] and bool(lay.text_mask.all())
    assert lay.system_index.tolist() == [[2], [0], [1]]
    for row in range(3):  # each row alone gives the same positions, shifted by its padding
        real = mask[row].bool()
        alone = TokenLayout.from_batch(input_ids[row][real][None], None, I)
        shift = int((~real).sum())
        assert not alone.ragged and alone.num_vision == lay.vision_counts[row]
        assert (alone.vision_index[0] + shift).tolist() == lay.vision_index[row][lay.vision_valid[row]].tolist()
        assert (alone.text_index[0] + shift).tolist() == lay.text_index[row].tolist()
    with pytest.raises(LayoutError, match=r"different numbers of vision tokens \[2, 4, 3\].*vision_counts"):
        lay.num_vision
    static = TokenLayout.from_batch(input_ids, mask, I, static=True)
    assert static.text_index.shape == (3, 8 - 2)
    assert lay.vision_run is None and not lay.text_tail


def test_equal_counts_keep_the_unpadded_tensors():
    input_ids = torch.tensor([[1, I, I, 4], [I, I, 5, 6]])
    lay = TokenLayout.from_batch(input_ids, None, I)
    assert not lay.ragged and lay.vision_valid is None and lay.vision_counts == (2, 2)
    assert lay.num_vision == lay.max_vision == 2 and lay.vision_valid_mask().all()
    with pytest.raises(LayoutError, match="row 1 has 3 image tokens, not a multiple of the 2"):
        TokenLayout.from_batch(torch.tensor([[1, I, I, 4, 4], [I, I, I, 5, 6]]), None, I, tokens_per_image=2)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("row", [
    [1, 2, I, I, I, 4, 5, 6],
    [1, I, I, 9, I, I, 4, 5],  # two spans: the text follows the last one
    [I, I, 4],  # no system part
])
def test_one_row_layout_equals_the_batched_layout(row, static):
    """A batch-1 prompt without padding takes a shorter path; every field equals the general path's (row 0 of the
    same row batched twice, which takes the general path)."""
    one = TokenLayout.from_batch(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), I, static=static)
    two = TokenLayout.from_batch(torch.tensor([row, row]), None, I, static=static)
    for name in ("valid", "vision_index", "text_index", "text_mask", "last_index", "vision_mask", "system_index",
                 "system_mask"):
        a, b = getattr(one, name), getattr(two, name)[:1]
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), name
    assert one.text_full == two.text_full and one.vision_spans == two.vision_spans[:1]
    assert one.vision_counts == two.vision_counts[:1] and not one.ragged


def test_one_row_errors_match_the_batched_path():
    for ids, match in (([1, 2, 3], "row 0 has no image token"), ([1, I, I], "row 0 has no text token")):
        with pytest.raises(LayoutError, match=match):
            TokenLayout.from_batch(torch.tensor([ids]), None, I)


def test_host_facts_for_the_engine_fast_paths():
    """text_tail / vision_run say (on the host) when the text is every row's last T tokens and the vision tokens one
    shared run: only without padding, filler or several spans."""
    one = TokenLayout.from_batch(torch.tensor([[1, 2, I, I, I, 4, 5]]), None, I)
    assert (one.text_tail, one.vision_run) == (True, 2)
    same = TokenLayout.from_batch(torch.tensor([[1, 2, I, I, I, 4, 5]] * 2), None, I)
    assert (same.text_tail, same.vision_run) == (True, 2)
    spans = TokenLayout.from_batch(torch.tensor([[1, I, I, 9, I, I, 4, 5]]), None, I)
    assert (spans.text_tail, spans.vision_run) == (True, None)
    shifted = TokenLayout.from_batch(torch.tensor([[1, 2, I, I, 4, 5], [1, I, I, 4, 5, 6]]), None, I)
    assert (shifted.text_tail, shifted.vision_run) == (False, None)  # texts of 2 and 3 tokens: filler
    ids = torch.tensor([[P, 1, I, I, 4], [1, 2, I, I, 4]])
    padded = TokenLayout.from_batch(ids, (ids != P).long(), I)
    assert (padded.text_tail, padded.vision_run) == (False, None)
    static = TokenLayout.from_batch(torch.tensor([[1, I, I, 4, 5]]), None, I, static=True)
    assert (static.text_tail, static.vision_run) == (False, 1)
