"""`python -m redlockdlm_cli`: the same as the `dlm` command."""

from .main import cli

cli(prog_name="dlm")
