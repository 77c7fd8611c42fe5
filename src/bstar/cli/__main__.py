"""`python -m bstar.cli ...` and `torchrun --nproc_per_node N -m bstar.cli ...`: the `bstar-engine` group."""

from bstar.cli import main

main()
