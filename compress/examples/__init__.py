"""Reference models on real data, shared by the demo, the benchmarks and the tests."""
