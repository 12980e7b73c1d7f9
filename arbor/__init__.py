"""The `arbor` command line: the top layer, the only code that composes agent/ and workers/."""
