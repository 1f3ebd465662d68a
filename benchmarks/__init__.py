"""One script per performance question; run as `python -m benchmarks.<name> [--quick]`."""
