"""The cache-codec benchmark on a small demo cache: every codec's rows decode to the reference's
ids, the measures are what they claim, and the report says what was measured.

    PYTHONPATH=. pytest bench/test_bench_cache_codec.py

The figures that count come from bench/bench_cache_codec.py at its default sizes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from bench_cache_codec import CODECS, main, markdown_report, topk_tail_kl


def test_topk_tail_kl_is_the_kl_over_stored_tokens_and_tail():
    p = torch.tensor([[math.log(0.5), math.log(0.3), -math.inf]], dtype=torch.float64)
    q = torch.tensor([[math.log(0.4), math.log(0.4), -math.inf]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert float(topk_tail_kl(p, q)) == pytest.approx(expected, rel=1e-9)
    assert float(topk_tail_kl(p, p)) == 0.0


def test_demo_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "codec.json"
    main(["--sources", "demo", "--examples", "40", "--reps", "1", "--out", str(out), "--markdown"])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["codec"] for r in rows] == [c.name for c in CODECS] * 2  # K = 16 and 64
    by = {(r["k"], r["codec"]): r for r in rows}
    for k in (16, 64):
        reference = by[k, "v1 fp32 (reference)"]
        assert reference["kl_max"] == 0.0 and reference["loss_rel_reference"] == 0.0
        v1, v2 = by[k, "v1 bf16"], by[k, "v2 6-bit (default)"]
        assert v2["bytes_per_token"] < 0.6 * v1["bytes_per_token"]
        assert 0 <= v2["kl_mean"] <= 1e-3 and v2["kl_max"] >= v2["kl_mean"]
        assert by[k, "v2 8-bit"]["kl_mean"] <= by[k, "v2 4-bit"]["kl_mean"]
        assert abs(v2["loss_rel_v1_bf16"]) < 1e-2 and v1["loss_rel_v1_bf16"] == 0.0
        assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert result["training_tokens_per_s"] > 0
    report = capsys.readouterr().out
    assert report.endswith(markdown_report(result) + "\n")
    assert "DistillKit (published, default) | | | | 300" in report
    assert "- demo (V = 263): bytes/token" in report
