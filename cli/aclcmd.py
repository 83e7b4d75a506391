"""`dlm acl`: print the least-privilege ACL rule of a redlockdlm user (`redlockdlm.acl`)."""

from __future__ import annotations

import secrets

import click

from redlockdlm import acl as acl_rules

from . import output


@click.command("acl")
@click.option("--user", default="dlm", show_default=True, metavar="NAME",
              help="The Redis user to create or reset.")
@click.option("--password-placeholder", is_flag=True,
              help=f"Write {acl_rules.PLACEHOLDER} instead of a generated password "
                   "(for documentation and configuration templates).")
@click.option("--namespace", metavar="NS", default=None,
              help="Allow only this namespace's keys and channels (default: every "
                   "namespace).")
@click.option("--no-function-load", is_flag=True,
              help="Allow EVAL instead of FUNCTION LOAD: no user can then replace the "
                   "Functions library other users run; scripts are sent whole (slower) "
                   "unless an administrator loaded the library.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def acl(user: str, password_placeholder: bool, namespace: str | None, no_function_load: bool,
        as_json: bool) -> None:
    """Print the ACL SETUSER line that gives USER exactly what redlockdlm needs: the
    library, the scripts' own commands, events, the CLI and the detector; keys dlm:* and
    the event channels (or one namespace's). Run it as an administrator on every instance
    (`dlm acl | redis-cli -h HOST -p PORT`, or paste it), then use
    redis://USER:PASSWORD@host:port URLs. Connects to nothing."""
    password = acl_rules.PLACEHOLDER if password_placeholder else secrets.token_urlsafe(24)
    args = acl_rules.rule_args(user, password, namespace=namespace,
                               function_load=not no_function_load)
    output.acl_rule("ACL SETUSER " + " ".join(args), args, user=user,
                    password=None if password_placeholder else password,
                    namespace=namespace, as_json=as_json)
