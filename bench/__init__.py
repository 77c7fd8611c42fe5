"""pytest-benchmark runs, each timing our code and a real peer in the same run (`pytest bench/ --benchmark-only`).
Models come from tests/model_factory.py: pyproject puts tests/ on pytest's import path."""
