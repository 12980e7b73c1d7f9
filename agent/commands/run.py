"""`arbor run`: the self-improvement loop (filled in by the loop)."""
