"""`sdrt bench`: placeholder replaced by the benchmark harness (issue 5)."""

import typer


def bench() -> None:
    """Latency benchmark stage by stage, side by side with diffusers."""
    raise typer.Exit(2)
