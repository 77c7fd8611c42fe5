"""`bstar-engine` command line. Each subcommand lives beside the code it drives."""

import sys

import click

from engine.errors import BStarError


class _Group(click.Group):
    """Turns user-facing errors into one readable line and a non-zero exit, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (BStarError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
def main():
    """Paged-KV inference engine and B-STaR self-improvement loop."""


def _register():
    from bstar.generate_cli import generate
    from bstar.run_cli import report_cmd, run
    from bstar.score_cli import score
    from bstar.sft_cli import sft

    for cmd in (generate, score, sft, run, report_cmd):
        main.add_command(cmd)


_register()

if __name__ == "__main__":  # torchrun -m bstar.cli run ...
    main()
