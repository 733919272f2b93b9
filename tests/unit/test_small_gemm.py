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


def test_bfloat16_rows_run_padded_to_a_bucket_with_the_same_result():
    from engine.linear import row_bucket

    assert [row_bucket(n) for n in (9, 17, 64, 65, 257, 1025)] == [9, 20, 64, 80, 320, 1280]
    assert all(n <= row_bucket(n) <= n * 1.25 for n in range(1, 5000))
    assert len({row_bucket(n) for n in range(17, 2049)}) == 28
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(37, 64, generator=generator).bfloat16()
    weight = torch.randn(48, 64, generator=generator).bfloat16()
    got = linear(x, weight)
    assert got.shape == (37, 48)
    torch.testing.assert_close(got, F.linear(x, weight), atol=0.0, rtol=0.0)


def test_bfloat16_gemms_of_every_row_count_keep_memory_bounded():
    """oneDNN keeps a weight copy per cached row count; the buckets keep those few."""
    def resident_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    weight = torch.randn(2816, 512).bfloat16()  # 2.9 MB: one copy per distinct shape
    before = resident_bytes()
    for rows in range(9, 600):
        linear(torch.zeros(rows, 512, dtype=torch.bfloat16), weight)
    growth = resident_bytes() - before
    assert growth < 120 * 2**20, f"{growth / 2**20:.0f} MiB for 591 row counts"
