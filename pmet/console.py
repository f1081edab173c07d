"""Console output shared by the `pmet` commands: progress and errors on stderr, results on stdout."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
out_console = Console()

METHOD_HELP = ("pmet; memit (one δ on the layer output, even spread, MEMIT's stopping rule); rome (rank-one, one "
               "layer, edits applied in sequence); ft (FT-W: L∞-constrained fine-tuning of one FFN projection).")
SET_HELP = ("Set one config field after the preset and the other options, VALUE read as YAML (repeatable): "
            "--set mom2_update_weight=5000 --set residual=stream.")
NULL_SPACE_HELP = ("AlphaEdit's null-space constrained update (Fang et al., ICLR 2025) in place of Eq. 9, for PMET and "
                   "MEMIT: Δ projected onto the null space of C0's keys and of earlier batches' keys (beyond the "
                   "paper, off by default; docs/METHOD.md).")
FORCE_HELP = "Replace outputs that exist (in an --out folder, only the files pmet wrote there)."
MODEL_HELP = "Embedded alias (smollm2-135m, gemma3-270m), a .gguf file, a local model directory or an HF id."


def fail_line(msg: str) -> None:
    """`error: msg` as one line on stderr (newlines inside `msg` are folded)."""
    text = " ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False, markup=True)


def fail(msg: str) -> None:
    """One line on stderr and exit code 2 (bad input never shows a traceback)."""
    fail_line(msg)
    raise typer.Exit(2)
