"""vllm.utils.network_utils: this host's address and a free port, as vLLM's helpers (TRL imports them)."""

import socket


def get_ip() -> str:
    """The address other hosts reach this one at (the interface of the default route), else loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))  # (UDP connect sends nothing: it only picks the route)
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


__all__ = ["get_ip", "get_open_port"]
