from setuptools import find_packages, setup

setup(
    name="bstar-engine",
    version="0.1.0",
    description="Paged-KV inference engine, Triton kernels and B-STaR self-improvement loop",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "bstar", "bstar.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The README pins torch==2.13.0 on the install line so a CPU machine gets the CPU build.
        "torch>=2.5",
        "triton>=3.0; platform_system=='Linux'",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy",
        "click>=8",
        "tqdm",
        "matplotlib",
        "math-verify[antlr4_13_2]>=0.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "scipy", "pytest-benchmark>=4"],
        "bench": ["pytest>=8", "pytest-benchmark>=4"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["bstar-engine=bstar.cli:main"]},
)
