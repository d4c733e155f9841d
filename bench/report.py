"""What a suite reports (tables, notes, targets) and how it is shown and saved.

Suites build plain :class:`Table` objects; this module renders them on the terminal
with rich and as markdown for ``bench/results/<device>-<date>.md``.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from .shapes import format_keep

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class TargetResult:
    """One performance target: ``value comparison limit``, e.g. ``1.04 ≤ 1.10``."""

    mode: str
    keep: float
    ratio: str
    comparison: str  # "≤" or "≥"
    limit: float
    value: float | None  # None: not measured in this run

    @property
    def status(self) -> str:
        if self.value is None:
            return "SKIP"
        met = self.value <= self.limit if self.comparison == "≤" else self.value >= self.limit
        return "PASS" if met else "FAIL"

    def __str__(self) -> str:
        keep = format_keep(self.keep)
        what = f"{self.mode} keep {keep}: {self.ratio} {self.comparison} {self.limit:g}×"
        if self.value is None:
            return f"SKIP  {what} (keep {keep} not measured)"
        return f"{self.status}  {what}, measured {format_ratio(self.value)}"


@dataclass
class SuiteReport:
    name: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    targets_note: str = ""


def format_ratio(value: float) -> str:
    return f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


# --------------------------------------------------------------------------- environment


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def results_path(device: torch.device, date: str) -> Path:
    """``<device>-<date>.md``, or ``<device>-<date>-<n>.md`` for the day's n-th run: never an earlier run's file."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or device.type
    path = RESULTS_DIR / f"{slug}-{date}.md"
    run = 2
    while path.exists():
        path = RESULTS_DIR / f"{slug}-{date}-{run}.md"
        run += 1
    return path


# --------------------------------------------------------------------------- rendering

_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "SKIP": "yellow"}


def print_reports(console: Console, title: str, header: list[str], reports: list[SuiteReport]) -> None:
    # Text objects, not markup strings: names such as "spa_kernels[cpu]" hold brackets.
    def line(text: str, style: str = "") -> None:
        console.print(Text("  " + text, style=style or ("bold red" if text.startswith("WARNING") else "")))

    console.print()
    console.print(Text(title, style="bold"))
    for text in header:
        line(text)
    for index, report in enumerate(reports):
        if index and report.notes:  # the first suite's notes continue the run's header
            console.print()
        for note in report.notes:
            line(note)
        for table in report.tables:
            rich_table = RichTable(title=Text(table.title, style="bold"), title_justify="left")
            for index, name in enumerate(table.headers):
                rich_table.add_column(Text(name), justify="left" if index == 0 else "right", overflow="fold")
            for row in table.rows:
                rich_table.add_row(*(Text(cell) for cell in row))
            console.print()
            console.print(rich_table)
            for note in table.notes:
                line(note)
        if report.targets:
            console.print()
            console.print(Text(f"targets ({report.name})", style="bold"))
            if report.targets_note:
                line(report.targets_note, "bold red")
            for target in report.targets:
                status, rest = str(target).split("  ", 1)
                console.print(Text.assemble("  ", (status, _STATUS_STYLE[target.status]), "  ", rest))


def to_markdown(title: str, header: list[str], reports: list[SuiteReport]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {line}" for line in header]
    for index, report in enumerate(reports):
        if index and report.notes:  # else they would read as items of the previous targets list
            lines += ["", f"## {report.name}", ""]
        lines += [f"- {note}" for note in report.notes]
        for table in report.tables:
            lines += ["", f"## {table.title}", ""]
            lines.append("| " + " | ".join(table.headers) + " |")
            lines.append("|" + "|".join([":---"] + ["---:"] * (len(table.headers) - 1)) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            if table.notes:
                lines.append("")
                lines += [f"{note}  " for note in table.notes]
        if report.targets:
            lines += ["", f"## targets ({report.name})", ""]
            if report.targets_note:
                lines += [report.targets_note, ""]
            lines += [f"- {target}" for target in report.targets]
    return "\n".join(lines) + "\n"


def save(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
