"""`python -m arbor ...` runs the CLI without the console script."""

from arbor.cli import app

app()
