"""Subcommands of ``soda-nvs``, one module each (see ``soda_diffusers/cli.py``)."""
