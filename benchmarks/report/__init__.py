"""The one benchmark report for any machine: python -m benchmarks.report (make report)."""
