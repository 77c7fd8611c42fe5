"""The engine's named choices as plain strings, light to import (no torch): the run and training configs
and the command line check against them before torch loads."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # bstar.engine.config.DTYPES maps them to torch dtypes
CPU_GEMMS = ("auto", "onednn", "mkl", "aten")  # the CPU GEMM library per choice (bstar.engine.model.linear)
