"""Printing for the ``tensorgrid`` command and the quickstart: consoles, tables of datasets and frames.
User data and paths are shown literally (escaped, never read as markup)."""

from __future__ import annotations

import unicodedata

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
for _c in (out, err):
    if not _c.is_terminal:  # pipes and logs: do not fold paths at 80 columns
        _c.width = 200


def safe(text: object) -> str:
    """``text`` fit for one terminal line: control and format characters (newlines, escape sequences,
    bidi overrides) and lone surrogates (undecodable bytes of a path) shown as escapes, never acted on."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Cf", "Cs")
                   else ch for ch in str(text))


def text(value: object) -> Text:
    """User data or a path as literal text in a table (rich would read "[...]" in it as markup)."""
    return Text(safe(value))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def progress(total: int | None, what: str) -> Progress:
    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                    TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)




def print_info(ds) -> None:
    t = Table(title=text(ds.url), show_header=False, title_justify="left")
    t.add_row("version", "-" if ds.version is None else str(ds.version))
    t.add_row("rows", f"{ds.num_rows:,}")
    t.add_row("shards", f"{ds.num_shards:,}" + (f" ({human_bytes(ds.size_bytes)})" if ds.size_bytes else ""))
    for f in ds.schema:
        t.add_row(text(f"  {f.name}"), text(str(f.type).replace("extension<arrow.fixed_shape_tensor", "tensor<")))
    out.print(t)


def print_frame(df, title: str | None = None) -> None:
    t = Table(title=None if title is None else text(title), title_justify="left")
    for c in df.columns:
        t.add_column(text(c), overflow="fold", max_width=40)
    for row in df.itertuples(index=False):
        t.add_row(*(text(_cell(v)) for v in row))
    out.print(t)


def _cell(v) -> str:
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"{v.dtype}[{'x'.join(map(str, v.shape))}]"
    if isinstance(v, bytes):
        return f"<{human_bytes(len(v))}>"
    s = str(v).replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."
