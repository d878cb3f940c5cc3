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
    with pytest.raises(LayoutError, match="not a multiple of the 576"):
        TokenLayout.from_batch(torch.tensor([[1] + [I] * 575 + [3]]), None, I, tokens_per_image=576)


def test_rows_with_different_image_counts_and_no_text():
    with pytest.raises(LayoutError, match="different numbers of image tokens"):
        TokenLayout.from_batch(torch.tensor([[1, I, I, 3], [1, I, 3, 3]]), None, I)
    with pytest.raises(LayoutError, match="no text token after"):
        TokenLayout.from_batch(torch.tensor([[1, 2, I, I]]), None, I)
