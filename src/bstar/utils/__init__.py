"""Small shared pieces below every room: jsonl.py (JSONL reading with line-numbered errors, atomic writing),
distributed.py (process groups: torchrun's, or one rank; records as bytes, barrier, timeout)."""
