"""pytest-benchmark runs, each timing our code and a real peer in the same run (`pytest bench/ --benchmark-only`).
Models come from bstar.testing.model_factory, the test suite's factory."""
