"""`python -m agent.cli_main` runs the CLI (the same entry point as the `arbor` script)."""

from agent.cli import app

if __name__ == "__main__":
    app()
