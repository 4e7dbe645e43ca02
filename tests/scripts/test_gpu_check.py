"""benchmarks/gpu_check.py: its `--smoke` run (every section's code path on CPU with tiny shapes) and its offline
package bootstrap (wheels installed with pip --no-index into a target folder)."""

import importlib.util
import json
import os
import sys
import zipfile

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_gpu_check():
    spec = importlib.util.spec_from_file_location(
        "benchmark_gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_runs_every_section(tmp_path):
    check = load_gpu_check()
    result = check.main(["--smoke", "--output", str(tmp_path / "gpu.json")])
    assert result["errors"] == {}
    assert json.loads((tmp_path / "gpu.json").read_text())["sections"].keys() == set(check.SECTIONS)
    loss = result["sections"]["loss"]["smoke"]
    assert 0.2 < loss["time_ratio"] < 5 and 0.5 < loss["memory_ratio"] < 2
    kernel = result["sections"]["entropy_kernel"]
    for name in ("logprobs", "entropy", "grad_hidden", "grad_weight"):  # fp32: the kernel's math is the softmax's
        assert kernel["float32_entropy_grad"][name]["relative"] < 1e-4
        assert kernel["float32_entropy_and_logprob_grad"][name]["relative"] < 1e-4
    rows = result["sections"]["rows"]
    for turns in check.SMOKE["row_turns"]:
        assert rows[f"step_{turns}"]["rows"] == check.SMOKE["row_episodes"] * turns  # one row per turn
        assert rows[f"packed_{turns}"]["rows"] == check.SMOKE["row_episodes"]  # one row per episode
        assert rows[f"step_{turns}"]["peak_bytes"] > 0 and rows[f"packed_{turns}"]["time_s"] > 0
    rollout = result["sections"]["rollout"]
    assert rollout["kv_reuse_on"]["refeed_ratio"] < rollout["kv_reuse_off"]["refeed_ratio"]
    assert rollout["kv_reuse_on"]["generated_tokens"] > 0
    table = check.report(result)
    assert "time ratio" in table and "KV reuse on" in table and "FAILED" not in table


def fake_wheel(folder, name: str, version: str) -> str:
    """A minimal pure-Python wheel of distribution `name` with one module, `name`."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}.py", f"VERSION = {version!r}\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_missing_packages_are_installed_from_the_wheel_folder(tmp_path, monkeypatch):
    check = load_gpu_check()
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    fake_wheel(wheels, "gpucheckprobe", "2.0.0")
    monkeypatch.setattr(check, "WHEELS", {"gpucheckprobe": "1.5", "pytest": "1.0"})  # pytest: installed, new enough
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert check.ensure_packages(str(wheels), str(site)) == ["gpucheckprobe"]
    import gpucheckprobe

    assert gpucheckprobe.VERSION == "2.0.0" and str(site) == sys.path[0]
    assert check.ensure_packages(str(wheels), str(site)) == []  # satisfied now
    sys.modules.pop("gpucheckprobe")


def test_a_missing_wheel_says_how_to_get_it(tmp_path, monkeypatch):
    check = load_gpu_check()
    monkeypatch.setattr(check, "WHEELS", {"gpucheckabsent": "1.0"})
    with pytest.raises(RuntimeError, match="pip download --no-deps"):
        check.ensure_packages(str(tmp_path), str(tmp_path / "site"))
