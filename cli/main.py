"""Entry point of the ``dlm`` command."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

import click


def _version() -> str:
    try:
        return _dist_version("redlockdlm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="dlm")
def cli() -> None:
    """Inspect and operate a redlockdlm lock manager."""


if __name__ == "__main__":  # pragma: no cover
    cli()
