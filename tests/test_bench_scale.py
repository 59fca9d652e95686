"""The scale benchmark's checks, computed from its own run records (the bench itself is not a test)."""

import pytest

from fmtransfer.bench.scale import scale_checks


def run(images: int, train_rss: float, train_head: float, compare_rss: float, compare_head: float) -> dict:
    return {
        "images": images,
        "train": {"peak_rss_mib": train_rss, "head_tensor_mib": train_head, "cache": {"bytes": 1000 * images}},
        "compare": {"peak_rss_mib": compare_rss, "head_tensor_mib": compare_head, "cache": {"bytes": 1005 * images}},
    }


def test_the_checks_are_the_growth_without_head_tensors_and_the_cache_over_its_base_entries():
    runs = [run(200, 2507, 930, 2589, 1094), run(100, 1927, 465, 2089, 547)]
    leakage = {"check_speedup_over_reference": 11.2, "faiss_exact_recall": 1.0, "faiss_exact_extra": 0}
    leakage |= {"faiss_near_recall": 0.99, "faiss_near_extra": 1}
    checks = scale_checks(runs, leakage)
    assert checks["train_rss_minus_head_growth"] == pytest.approx((2507 - 930) / (1927 - 465) - 1, abs=1e-3)
    assert checks["compare_rss_minus_head_growth"] == pytest.approx((2589 - 1094) / (2089 - 547) - 1, abs=1e-3)
    assert checks["compare_cache_over_base_100"] == checks["compare_cache_over_base_200"] == 1.005
    assert checks["leakage_speedup_over_reference"] == 11.2
    assert (checks["leakage_near_recall"], checks["leakage_near_extra"]) == (0.99, 1)


def test_one_size_has_no_growth_and_no_leakage_run_has_no_leakage_checks():
    checks = scale_checks([run(100, 1927, 465, 2089, 547)], None)
    assert set(checks) == {"compare_cache_over_base_100"}
