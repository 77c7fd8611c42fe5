import os
import sys

# Benchmarks build their models with the tests' factory.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
