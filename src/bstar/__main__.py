"""`python -m bstar ...`: the `bstar-engine` command line."""

from bstar.cli import main

main()
