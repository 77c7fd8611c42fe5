"""The vLLM release whose API bstar.vllm mirrors (one place: `vllm.__version__` and, after install(), the
"vllm" distribution's version)."""

VLLM_API_VERSION = "0.28.0"  # inside TRL 1.16's accepted range (0.22.0 to 0.31.0); lm-eval needs >= 0.9.0
