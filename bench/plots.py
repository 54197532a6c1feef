"""What the benchmark figures share: a headless two-panel figure, median points with min-max bars
over rounds (``loadtest.machine.spread`` dicts), the machine in the title, and saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(figsize: tuple[float, float] = (11, 4.2)) -> tuple[Any, tuple[Any, Any]]:
    """A figure with two side-by-side axes, drawn without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=figsize)
    return fig, (left, right)


def spread_errorbar(ax, xs: list, spreads: list[dict], fmt: str = "-o", label: str | None = None) -> None:
    """Medians at ``xs`` with bars from min to max (each item of ``spreads``: min/median/max)."""
    med = [s["median"] for s in spreads]
    lo = [s["median"] - s["min"] for s in spreads]
    hi = [s["max"] - s["median"] for s in spreads]
    ax.errorbar(xs, med, yerr=[lo, hi], fmt=fmt, capsize=3, label=label)


def finish_axes(axes, xticks: list | None = None, legend_fontsize: float | None = None) -> None:
    """Ticks at exactly ``xticks`` (labelled as given, also on log axes), a light grid, a legend."""
    for ax in axes:
        if xticks is not None:
            ax.set_xticks(xticks, [str(x) for x in xticks])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=legend_fontsize)


def machine_title(machine: dict, *details: str) -> str:
    """'<cpu> (<n> cores), <details...>' from ``loadtest.machine.machine_info()``."""
    return ", ".join([f"{machine['cpu_model']} ({machine['cpu_count']} cores)", *details])


def save(fig, path: Path, title: str | None = None) -> None:
    """Title (small), tight layout, write ``path`` (folders made), free the figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
