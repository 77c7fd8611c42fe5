"""vllm.v1"""
