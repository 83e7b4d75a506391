"""Command-line interface of redlockdlm (installed as ``redlockdlm_cli``, entry point ``dlm``)."""
