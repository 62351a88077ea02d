"""bench/gpu_check.py, the one script a GPU host runs: stage timeouts kill the stage and keep going, results are
written after every stage, the table and the steady-state throughput are computed from what the stages wrote.
(The full script is checked end to end on CPU with ``bench/gpu_check.sh OUT --smoke``: minutes, not CI.)"""

import importlib.util
import json
import os
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_timeout_kills_the_child_and_reports_it(gpu_check, tmp_path):
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('started', flush=True); " \
            "time.sleep(60)"
    t0 = time.time()
    info, stdout = gpu_check.run_stage("sleepy", [sys.executable, "-c", child], {}, 3, tmp_path)
    assert info["status"] == "timeout" and time.time() - t0 < 30
    assert "started" in stdout and "started" in (tmp_path / "sleepy.log").read_text()
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child is gone
    info, _ = gpu_check.run_stage("fails", [sys.executable, "-c", "raise SystemExit(3)"], {}, 30, tmp_path)
    assert info["status"] == "failed" and info["rc"] == 3


def test_env_stage_writes_summary(gpu_check, tmp_path):
    summary = gpu_check.main([str(tmp_path), "--stages", "env"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["stages"]["env"]["status"] == "ok" == summary["stages"]["env"]["status"]
    env = written["stages"]["env"]["results"]
    assert env["backend"] == "cpu" and env["gdn_auto"] == "xla" and env["attention_auto_bf16_d128"] == "xla"
    assert "env" in (tmp_path / "table.txt").read_text()


def test_train_summary_and_ratios(gpu_check, tmp_path):
    rows = [{"step": 10, "kind": "train", "loss": 3.0, "tokens_per_s": 1000.0},  # includes compile: dropped
            {"step": 20, "kind": "train", "loss": 2.5, "tokens_per_s": 70000.0},
            {"step": 20, "kind": "eval", "exact": 0.1},
            {"step": 30, "kind": "train", "loss": 2.0, "tokens_per_s": 78000.0},
            {"step": 40, "kind": "train", "loss": 1.5, "tokens_per_s": 74000.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = gpu_check.train_summary(path)
    assert s["steady_tokens_per_s"] == 74000 and s["last_step"] == 40 and s["rows"] == 4
    bench_rows = [dict(kernel="gdn", impl="pallas", heads=16, mode="fwd", ms=1.5),
                  dict(kernel="gdn", impl="fla", heads=16, mode="fwd", ms=1.0),
                  dict(kernel="attention", impl="pallas", heads=16, mode="fwd+bwd", ms=3.0),
                  dict(kernel="attention", impl="cudnn", heads=16, mode="fwd+bwd", ms=2.0)]
    assert gpu_check.ratios(bench_rows) == ["attention pallas / cudnn  H=16 fwd+bwd: 1.50x",
                                            "gdn pallas / fla  H=16 fwd: 1.50x"]


def test_partial_test_stage_is_counted_from_its_log(gpu_check, tmp_path):
    log = ("tests/test_kernels_on_device.py::test_a[x] PASSED [ 25%]\n"
           "tests/test_kernels_on_device.py::test_b[y] FAILED [ 50%]\n")
    r = gpu_check.stage_results("tests", tmp_path, log)
    assert (r["tests"], r["failures"], r["partial"]) == (2, 1, True)
