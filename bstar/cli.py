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

    main.add_command(generate)
    for module, name in (("bstar.score_cli", "score"), ("bstar.sft_cli", "sft")):
        try:
            mod = __import__(module, fromlist=[name])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        main.add_command(getattr(mod, name))


_register()
