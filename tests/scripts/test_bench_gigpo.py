"""benchmarks/bench_gigpo.py in its seconds-long `--tiny` setting (so it cannot rot)."""

import json

from test_benchmarks import load_benchmark


def test_bench_gigpo_tiny(tmp_path):
    result = load_benchmark("bench_gigpo").main(["--tiny", "--output", str(tmp_path / "gigpo.json")])
    assert json.loads((tmp_path / "gigpo.json").read_text())["ms"] == result["ms"]
    assert result["turns_total"] == 2 * 4 * 6 and all(v > 0 for v in result["ms"].values())
    for metrics in result["metrics"].values():
        assert 0 < metrics["gigpo/anchor_coverage"] <= 1 and metrics["gigpo/step_groups"] >= 2
