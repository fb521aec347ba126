"""`python -m lowbitdm_cli` (and `torchrun -m lowbitdm_cli`) runs the CLI."""

from lowbitdm_cli.cli import entrypoint

entrypoint()
