"""`bstar-engine` command line: the group (errors as one line, not a traceback) and one module per
subcommand:

    run.py       bstar-engine run       the B-STaR loop (bstar.loop.controller); --compare runs two modes
    report.py    bstar-engine report    redraw a run's plots and report.md
    generate.py  bstar-engine generate  sample candidates with the engine
    score.py     bstar-engine score     PRM step scores
    sft.py       bstar-engine sft       supervised fine-tuning (bstar.train)
    serve.py     bstar-engine serve     the OpenAI-compatible server (bstar.serve)

`python -m bstar.cli ...` and `torchrun ... -m bstar.cli ...` run the same group. The heavy modules
(torch, transformers, the engine, matplotlib) load when a command runs, so --help stays fast.
"""

import errno
import sys

import click

from bstar.cli.generate import generate
from bstar.cli.report import report_cmd
from bstar.cli.run import run
from bstar.cli.score import score
from bstar.cli.serve import serve
from bstar.cli.sft import sft
from bstar.errors import BStarError

_RETRYABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class _Group(click.Group):
    """Turns user-facing errors into one readable line and a non-zero exit, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BStarError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:  # a missing file, no permission, no space left, a read-only disk...
            where = f"{e.filename}: " if e.filename else ""
            hint = "; free space (or fix permissions) and rerun (`run --resume DIR` continues a run)"
            click.echo(f"error: {where}{e.strerror or e}{hint if e.errno in _RETRYABLE else ''}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
def main():
    """Paged-KV inference engine and B-STaR self-improvement loop."""


for _cmd in (generate, score, sft, run, report_cmd, serve):
    main.add_command(_cmd)
