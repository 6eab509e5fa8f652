"""The benchmark suite (pytest benchmarks/ --benchmark-only) and the report (python -m benchmarks.report)."""
