"""vllm.utils: network_utils (what TRL imports at load)."""
