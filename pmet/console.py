"""Console output shared by the `pmet` commands: progress and errors on stderr, results on stdout."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)
out_console = Console()

MODEL_HELP = "Embedded alias (smollm2-135m, gemma3-270m), a .gguf file, a local model directory or an HF id."


def fail(msg: str) -> None:
    """One line on stderr and exit code 2 (bad input never shows a traceback)."""
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)
