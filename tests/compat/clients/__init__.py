"""Scripts that run real vLLM clients (TRL, lm-evaluation-harness) on the engine through bstar.vllm, each in
its own process (install() aliases `vllm` process-wide); tests/compat/test_vllm_clients.py runs them."""
