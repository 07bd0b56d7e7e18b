"""Allocation report: a Pareto plot, a per-layer format chart and a markdown summary.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no
display, no global backend switch). Each file is written to a temporary name and renamed
into place so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ptq.passes.allocation._io import atomic_write_bytes, atomic_write_text
from ptq.passes.allocation.problem import AllocationProblem
from ptq.passes.allocation.solver import Allocation

ValueOf = Callable[[Allocation], float]


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    pareto_png: Path
    layers_png: Path


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def plot_pareto(
    path: Path,
    frontier: Sequence[Allocation],
    uniform: Sequence[Allocation] = (),
    *,
    value: ValueOf = lambda a: a.objective,
    ylabel: str = "predicted loss increase (sum dL)",
    chosen: Allocation | None = None,
    colours: Mapping[str, str] | None = None,
) -> None:
    """Bits/weight (x) against ``value`` (y; default the predicted loss increase, pass
    e.g. a measured-perplexity lookup) for the swept allocations (a line) and each
    uniform scheme (its own labelled marker, coloured by ``colours[candidate]``)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    pts = sorted(frontier, key=lambda a: a.bits_per_weight)
    if pts:
        ax.plot(
            [a.bits_per_weight for a in pts],
            [value(a) for a in pts],
            "o-",
            color="black",
            ms=4,
            label="mixed precision (ILP)" if pts[0].method == "ilp" else pts[0].method,
        )
    markers = "sD^v<>pPXh"
    for i, a in enumerate(sorted(uniform, key=lambda a: a.bits_per_weight)):
        label = next(iter(a.choice.values()), "?")
        style = markers[i % len(markers)]
        colour = (colours or {}).get(label, f"C{i % 10}")
        ax.plot(a.bits_per_weight, value(a), style, ms=8, color=colour, label=label)
    if chosen is not None:
        ax.plot(chosen.bits_per_weight, value(chosen), "*", ms=16, color="red", label="chosen")
    ax.set_xlabel("bits per weight (codes + scales + LoRC)")
    ax.set_ylabel(ylabel)
    ax.set_title("Loss vs size: mixed precision and uniform schemes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)


def layer_bits(problem: AllocationProblem, alloc: Allocation) -> np.ndarray:
    """Bits per weight of each layer under ``alloc`` (scales and LoRC included)."""
    picks = [problem.names.index(alloc.choice[layer]) for layer in problem.layers]
    nbytes = problem.nbytes[np.arange(len(picks)), picks]
    return 8 * nbytes / np.array([n * k for n, k in problem.shapes], dtype=np.float64)


def candidate_colours(problem: AllocationProblem) -> dict[str, str]:
    """One matplotlib colour per candidate, shared by both figures."""
    return {n: f"C{k % 10}" for k, n in enumerate(problem.names)}


def plot_layers(path: Path, problem: AllocationProblem, alloc: Allocation) -> None:
    """Bar per layer (model order): height = bits/weight, colour = chosen candidate."""
    bits = layer_bits(problem, alloc)
    names = problem.names
    colours = candidate_colours(problem)
    width = min(24.0, max(6.0, 0.18 * len(problem.layers)))
    fig = Figure(figsize=(width, 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(problem.layers))
    chosen = [alloc.choice[layer] for layer in problem.layers]
    ax.bar(x, bits, color=[colours[c] for c in chosen])
    handles = [Patch(color=colours[n], label=n) for n in names if n in chosen]
    ax.set_xticks(x, problem.layers, rotation=90, fontsize=6 if len(x) > 20 else 8)
    ax.set_ylabel("bits per weight")
    ax.set_title(f"Chosen format per layer ({alloc.bits_per_weight:.3f} bits/weight overall)")
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def _summary_row(a: Allocation, value: ValueOf, note: str = "") -> str:
    label = next(iter(a.choice.values())) if a.method == "uniform" else a.method
    label += note
    return (
        f"| {label} | {a.bits_per_weight:.4f} | {a.total_bytes:,} | {value(a):.6g} | {a.status} |"
    )


def render_markdown(
    problem: AllocationProblem,
    chosen: Allocation,
    frontier: Sequence[Allocation],
    uniform: Sequence[Allocation],
    *,
    value: ValueOf,
    ylabel: str,
    images: tuple[str, str],
) -> str:
    """The markdown text of the report (images referenced by relative path)."""
    limits = chosen.budgets or ((chosen.unit, chosen.budget),)
    budget = " and ".join(
        f"{bound * 1e3:.6g} ms" if unit == "seconds" else f"{bound:,.0f} B"
        for unit, bound in limits
    )
    lines = [
        "# Mixed-precision bit allocation",
        "",
        f"Chosen by **{chosen.method}** ({chosen.status}): budget {budget}, "
        f"{chosen.total_bytes:,} bytes = "
        f"**{chosen.bits_per_weight:.4f} bits/weight** over {problem.n_weights:,} weights, "
        f"{ylabel} {value(chosen):.6g}"
        + (f", modelled latency {chosen.seconds * 1e3:.6g} ms." if chosen.seconds else "."),
        "",
        f"![Pareto frontier]({images[0]})",
        "",
        f"![Format per layer]({images[1]})",
        "",
        "## Schemes",
        "",
        f"| scheme | bits/weight | bytes | {ylabel} | status |",
        "|---|---|---|---|---|",
        _summary_row(chosen, value, " (chosen)"),
        *(_summary_row(a, value) for a in sorted(uniform, key=lambda a: a.bits_per_weight)),
        *(_summary_row(a, value) for a in sorted(frontier, key=lambda a: a.bits_per_weight)),
        "",
        "## Layers",
        "",
        "| # | layer | shape | candidate | bits/weight | bytes | dL |",
        "|---|---|---|---|---|---|---|",
    ]
    bits = layer_bits(problem, chosen)
    for i, layer in enumerate(problem.layers):
        j = problem.names.index(chosen.choice[layer])
        n, k = problem.shapes[i]
        lines.append(
            f"| {i} | `{layer}` | {n}x{k} | {chosen.choice[layer]} | {bits[i]:.4f} | "
            f"{int(problem.nbytes[i, j]):,} | {problem.loss[i, j]:.6g} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    directory: str | os.PathLike[str],
    problem: AllocationProblem,
    chosen: Allocation,
    frontier: Sequence[Allocation] = (),
    uniform: Sequence[Allocation] = (),
    *,
    value: ValueOf = lambda a: a.objective,
    ylabel: str = "predicted loss increase",
) -> ReportFiles:
    """Write ``pareto.png``, ``layers.png`` and ``report.md`` (embedding both) into
    ``directory`` (created if missing).

    Args:
        directory: Output folder.
        problem: The problem ``chosen`` solves (shapes, bytes, losses per layer).
        chosen: The allocation to describe layer by layer.
        frontier: A budget sweep (see :func:`ptq.passes.allocation.solver.sweep`).
        uniform: Uniform baselines (see ``uniform_allocations``).
        value: The y value of an allocation (default: its predicted loss increase).
        ylabel: Name of ``value`` for axes and tables.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / "report.md", out / "pareto.png", out / "layers.png")
    plot_pareto(
        files.pareto_png,
        frontier,
        uniform,
        value=value,
        ylabel=ylabel,
        chosen=chosen,
        colours=candidate_colours(problem),
    )
    plot_layers(files.layers_png, problem, chosen)
    text = render_markdown(
        problem,
        chosen,
        frontier,
        uniform,
        value=value,
        ylabel=ylabel,
        images=(files.pareto_png.name, files.layers_png.name),
    )
    atomic_write_text(files.markdown, text)
    return files
