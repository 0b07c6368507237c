"""Parity's memory budget: chunks sized from the codes one image returns, the same figures at any chunk size."""
import json

import pytest

from qvit_export import QvitError
from qvit_export.parity import HELD_BYTES_PER_CODE, PEAK_BYTES_PER_CODE, compare, images_per_chunk


def test_chunk_size_follows_the_codes_of_one_image():
    # DINOv2-S/14 at 518 px: 1,374 tokens, 6 heads, 12 blocks; attention probabilities dominate
    attn = 6 * 1374 * 1374
    per_block = [attn, 1374 * 384 * 3, 1374 * 384, 1374 * 384, 1374 * 1536]
    sizes = per_block * 12
    per_image = HELD_BYTES_PER_CODE * sum(sizes) + PEAK_BYTES_PER_CODE * attn
    assert images_per_chunk(sizes, 2048, 250) == (2048 << 20) // per_image
    assert 1 <= images_per_chunk(sizes, 2048, 250) < 17  # the photographs no longer go in one batch
    assert images_per_chunk(sizes, 64, 250) == 1  # never fewer than one image
    assert images_per_chunk([784] * 18, 2048, 250) == 250  # small codes: the batch size bounds it
    with pytest.raises(QvitError, match="must be positive"):
        images_per_chunk(sizes, 0, 250)


def test_a_small_budget_gives_the_same_report_in_more_chunks(fmnist_exports):
    qm, path = fmnist_exports[4]
    from qvit_export.data import fashion_mnist

    images = fashion_mnist("test", limit=300).tensors[0]
    whole = compare(qm, path, images, progress=False)
    chunked = compare(qm, path, images, progress=False, memory_mb=1)
    assert whole.images_per_chunk == 250 and chunked.images_per_chunk < whole.images_per_chunk
    a, b = json.loads(whole.to_json()), json.loads(chunked.to_json())
    assert a["top1_agree"] == b["top1_agree"] and whole.failures() == chunked.failures() == []
    assert a["max_abs_logit_diff"] == pytest.approx(b["max_abs_logit_diff"], abs=1e-3)
    # every code is compared either way; a GEMM's rounding can depend on how many rows it multiplies at once, which
    # moves a value on a rounding tie by one LSB now and then (seen: 1 of 1,920,000 codes)
    assert {k: q["codes"] for k, q in a["quantizers"].items()} == {k: q["codes"] for k, q in b["quantizers"].items()}
    for name, q in a["quantizers"].items():
        assert abs(q["equal"] - b["quantizers"][name]["equal"]) <= q["codes"] * 1e-5, name
