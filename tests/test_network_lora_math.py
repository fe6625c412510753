"""The LoRA linear algebra shared by resize_lora, merge_lora and extract_lora (trainer.network.lora_math): deltas
compute what the module computes, splits are torch's best rank-k, and the dynamic rank rules pick what
sd-scripts' networks/resize_lora.py formulas give on hand-made singular values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.network import lora_math


def test_linear_delta_is_scaled_up_times_down():
    torch.manual_seed(0)
    down, up = torch.randn(4, 10), torch.randn(6, 4)
    x = torch.randn(3, 10)
    delta = lora_math.lora_delta(down, up, torch.tensor(2.0))
    torch.testing.assert_close(x @ delta.T, (x @ down.T @ up.T) * 0.5)
    torch.testing.assert_close(lora_math.lora_delta(down, up, None), up @ down)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_delta_computes_what_the_down_then_up_convs_compute(kernel):
    torch.manual_seed(0)
    down, up = torch.randn(4, 5, kernel, kernel), torch.randn(7, 4, 1, 1)
    x = torch.randn(2, 5, 9, 9)
    delta = lora_math.lora_delta(down, up, 8)
    assert delta.shape == (7, 5, kernel, kernel)
    expected = F.conv2d(F.conv2d(x, down, padding=kernel // 2), up) * 2.0
    torch.testing.assert_close(F.conv2d(x, delta, padding=kernel // 2), expected, rtol=1e-4, atol=1e-4)


def test_scale_is_alpha_over_rank_in_float32_and_one_without_alpha():
    assert lora_math.lora_scale(3, torch.tensor(1)) == float(torch.tensor(1.0) / 3)
    assert lora_math.lora_scale(16, None) == 1.0


def test_product_svd_has_the_singular_values_of_the_dense_product():
    torch.manual_seed(0)
    up, down = torch.randn(40, 6), torch.randn(6, 3, 3, 3)
    u, s, vh = lora_math.product_svd(up, down)
    dense = up @ down.flatten(1)
    assert s.shape == (6,)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u * s @ vh, dense, rtol=1e-5, atol=1e-4)


def test_truncate_is_torchs_best_rank_k_and_the_error_is_the_dropped_singular_values():
    torch.manual_seed(0)
    matrix = torch.randn(30, 20)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    down, up = lora_math.truncate(u, s, vh, 5)
    assert down.shape == (5, 20) and up.shape == (30, 5)
    torch.testing.assert_close(up @ down, u[:, :5] @ torch.diag(s[:5]) @ vh[:5])
    error = torch.linalg.matrix_norm(matrix - up @ down)
    torch.testing.assert_close(error, s[5:].pow(2).sum().sqrt())


def test_best_rank_split_of_a_conv_delta_gives_module_shapes_and_caps_the_rank_by_channels():
    torch.manual_seed(0)
    delta = torch.randn(8, 3, 3, 3)
    down, up = lora_math.best_rank_split(delta, 16)
    assert down.shape == (3, 3, 3, 3) and up.shape == (8, 3, 1, 1)  # rank <= min(out, in channels), as sd-scripts
    low_rank = torch.randn(8, 2) @ torch.randn(2, 27)
    down, up = lora_math.best_rank_split(low_rank.reshape(8, 3, 3, 3), 2)
    torch.testing.assert_close(lora_math.lora_delta(down, up, 2), low_rank.reshape(8, 3, 3, 3), rtol=1e-5, atol=1e-5)


def test_clamp_quantile_clamps_both_factors_to_the_quantile_of_their_values():
    torch.manual_seed(0)
    u, s, vh = torch.linalg.svd(torch.randn(50, 40), full_matrices=False)
    down, up = lora_math.truncate(u, s, vh, 8, clamp_quantile=0.9)
    exact_down, exact_up = lora_math.truncate(u, s, vh, 8)
    high = torch.quantile(torch.cat([exact_up.flatten(), exact_down.flatten()]), 0.9)
    torch.testing.assert_close(up, exact_up.clamp(-high, high))
    torch.testing.assert_close(down, exact_down.clamp(-high, high))
    assert not torch.equal(up, exact_up)
    same_down, same_up = lora_math.truncate(u, s, vh, 8, clamp_quantile=1.0)
    assert torch.equal(same_up, exact_up) and torch.equal(same_down, exact_down)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_quantile_equals_torch_quantile(q):
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lora_math.quantile(values, q), torch.quantile(values, q))


# Hand-made singular values: S = [10, 5, 2, 1, 0.5, 0, 0, 0] (sum 18.5; squares sum 130.25).
S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("method, param, expected", [
    # sv_ratio: count of S > S[0] / param, then + 1 (sd-scripts' rank_resize adds one past the index)
    ("sv_ratio", 4.0, 3),  # S > 2.5: [10, 5] -> 2 -> 3
    ("sv_ratio", 12.0, 5),  # S > 0.833: [10, 5, 2, 1] -> 4 -> 5
    ("sv_ratio", 1.0, 2),  # S > 10: none -> clamped to 1 -> 2
    # sv_cumulative: cumsum / 18.5 = [.541, .811, .919, .973, 1, ...]; first >= param, + 1, then + 1
    ("sv_cumulative", 0.9, 4),  # first >= .9 is position 2 -> 3 -> 4
    ("sv_cumulative", 0.5, 2),  # position 0 -> 1 -> 2
    # sv_fro: cumsum of squares / 130.25 = [.768, .960, .990, .998, 1, ...]; first >= param**2, + 1, then + 1
    ("sv_fro", 0.9, 3),  # .81 -> position 1 -> 2 -> 3
    ("sv_fro", 0.995, 4),  # .990025 -> position 2 (.9904) -> 3 -> 4
    (None, None, 6),  # no method: max_rank
])
def test_dynamic_methods_pick_the_rank_sd_scripts_formulas_give(method, param, expected):
    assert lora_math.choose_rank(S, 6, method, param) == expected


def test_dynamic_rank_is_capped_by_max_rank_and_a_zero_matrix_gets_rank_1():
    assert lora_math.choose_rank(S, 3, "sv_ratio", 12.0) == 3
    assert lora_math.choose_rank(torch.zeros(8), 6, "sv_fro", 0.9) == 1
    assert lora_math.choose_rank(torch.zeros(8), 6) == 1


def test_the_last_index_is_clamped_to_the_full_layer_length_not_the_nonzero_values():
    s = torch.tensor([3.0, 2.0, 1.0])
    # All three exceed 3 / 1e9: 3 clamped to len - 1 = 2, + 1 -> 3; as part of a 10-wide layer: 3 + 1 = 4.
    assert lora_math.choose_rank(s, 16, "sv_ratio", 1e9) == 3
    assert lora_math.choose_rank(s, 16, "sv_ratio", 1e9, full_length=10) == 4


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="sv_ratio"):
        lora_math.choose_rank(S, 4, "sv_max", 1.0)


def test_retained_reports_sum_frobenius_and_ratio_of_the_kept_values():
    kept = lora_math.retained(S, 2)
    assert kept.sum_retained == pytest.approx(15 / 18.5)
    assert kept.fro_retained == pytest.approx((125 / 130.25) ** 0.5)
    assert kept.max_ratio == pytest.approx(2.0)
