"""The small-GEMM CPU kernel (decode's linear layers) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.linear import SMALL_ROWS, linear


@pytest.mark.parametrize("rows", range(1, SMALL_ROWS + 1))
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (520, 37), (13, 5)])
def test_float32_matches_f_linear(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4,
                               rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bfloat16_matches_float32_sums(rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=generator).bfloat16()
    weight = torch.randn(200, 256, generator=generator).bfloat16()
    got = linear(x, weight)
    assert got.dtype == torch.bfloat16
    want = F.linear(x.float(), weight.float())  # the kernel sums in float32, then rounds
    torch.testing.assert_close(got.float(), want.bfloat16().float(), atol=0.0, rtol=1e-2)


def test_two_threads_and_many_columns_give_the_same_result():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 512, generator=generator)
    weight = torch.randn(2816, 512, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, weight)
        torch.set_num_threads(2)
        two = linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, F.linear(x, weight), atol=1e-4, rtol=1e-5)


def test_more_rows_and_other_layouts_match_f_linear():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(SMALL_ROWS + 1, 64, generator=generator)
    weight = torch.randn(32, 64, generator=generator)
    bias = torch.randn(32, generator=generator)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5,
                               rtol=1e-5)
    transposed = torch.randn(64, 32, generator=generator).t()  # not contiguous
    torch.testing.assert_close(linear(x[:2], transposed), F.linear(x[:2], transposed),
                               atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, 3, 64, generator=generator)
    torch.testing.assert_close(linear(x3, weight), F.linear(x3, weight), atol=1e-5, rtol=1e-5)
