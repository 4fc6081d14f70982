"""Command-line interface (``medlatent``): wiring only, heavy modules imported per command."""
