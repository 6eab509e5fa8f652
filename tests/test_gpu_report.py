"""The GPU report's verdict logic, checked on a synthetic junit file (no GPU needed)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("gpu_report", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_report)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_noise" name="test_a[cpu]"/>
<testcase classname="tests.test_noise" name="test_a[cuda]"><skipped message="no CUDA device"/></testcase>
<testcase classname="tests.test_x" name="test_interp"><skipped message="interpreter only"/></testcase>
<testcase classname="tests.test_x" name="test_bad"><failure message="boom"/></testcase>
<testcase classname="tests.test_x" name="test_err"><error message="boom"/></testcase>
</testsuite></testsuites>"""


def test_summary_flags_failures_and_cuda_skips(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    s = gpu_report.summarize_junit(path)
    assert s["tests"] == 5 and s["passed"] == 1
    assert s["failed"] == ["tests.test_x::test_bad", "tests.test_x::test_err"]
    assert s["cuda_skips"] == ["tests.test_noise::test_a[cuda]"] and len(s["skipped"]) == 2


def test_missing_junit_counts_nothing(tmp_path):
    assert gpu_report.summarize_junit(tmp_path / "none.xml")["tests"] == 0
