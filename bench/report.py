"""The results: one row per case, as a markdown table, a JSON file and a latency chart."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Row:
    case: str  # "1", "2", ..., "6a"
    name: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    # CPU seconds per 1,000 answered requests: the process under test (the bare server, the
    # broker, its workers), the load generator processes, the emulator.
    server_cpu_per_1k: float | None
    client_cpu_per_1k: float | None
    emulator_cpu_per_1k: float | None
    notes: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def build(
        cls,
        case: str,
        name: str,
        latencies: list[float],
        seconds: float,
        errors: int,
        *,
        server_cpu: float | None,
        client_cpu: float | None,
        emulator_cpu: float | None,
        notes: dict[str, Any] | None = None,
    ) -> Row:
        ms = sorted(x * 1000 for x in latencies)
        n = len(ms)

        def per_1k(cpu: float | None) -> float | None:
            return None if cpu is None or n == 0 else cpu / n * 1000

        return cls(
            case=case,
            name=name,
            requests=n,
            errors=errors,
            seconds=seconds,
            rps=n / seconds if seconds > 0 else 0.0,
            p50_ms=percentile(ms, 50),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            server_cpu_per_1k=per_1k(server_cpu),
            client_cpu_per_1k=per_1k(client_cpu),
            emulator_cpu_per_1k=per_1k(emulator_cpu),
            notes=notes or {},
            latencies_ms=ms,
        )


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(rows: list[Row], summary: list[str], machine: str) -> str:
    lines = [
        f"Machine: {machine}.",
        "",
        "| # | case | requests | req/s | p50 ms | p90 ms | p99 ms "
        "| server CPU s/1k req | load-gen CPU s/1k req | emulator CPU s/1k req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        errors = f" ({r.errors} errors)" if r.errors else ""
        lines.append(
            f"| {r.case} | {r.name} | {r.requests:,}{errors} | {_num(r.rps, 0)} "
            f"| {_num(r.p50_ms)} | {_num(r.p90_ms)} | {_num(r.p99_ms)} "
            f"| {_num(r.server_cpu_per_1k, 3)} | {_num(r.client_cpu_per_1k, 3)} "
            f"| {_num(r.emulator_cpu_per_1k, 3)} |"
        )
    return "\n".join([*lines, "", *summary]) + "\n"


def write_json(path: Path, rows: list[Row], summary: dict[str, Any]) -> None:
    data = {
        "summary": summary,
        "cases": [{k: v for k, v in asdict(r).items() if k != "latencies_ms"} for r in rows],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_chart(path: Path, rows: list[Row], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(13, 5.2), width_ratios=[3, 2])
    for r in rows:
        if not r.latencies_ms:
            continue
        n = len(r.latencies_ms)
        ys = [(i + 1) / n for i in range(n)]
        cdf.plot(r.latencies_ms, ys, label=f"{r.case}. {r.name}", linewidth=1.4)
    cdf.set_xscale("log")
    cdf.set_xlabel("latency (ms, log scale)")
    cdf.set_ylabel("fraction of requests at or below")
    cdf.set_title("Latency distributions (CDF)")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=7, loc="lower right")

    shown = [r for r in rows if r.latencies_ms]
    labels = [r.case for r in shown]
    xs = range(len(shown))
    width = 0.27
    for offset, attr, label in (
        (-width, "p50_ms", "p50"),
        (0.0, "p90_ms", "p90"),
        (width, "p99_ms", "p99"),
    ):
        bars.bar([x + offset for x in xs], [getattr(r, attr) for r in shown], width, label=label)
    bars.set_xticks(list(xs), labels)
    bars.set_yscale("log")
    bars.set_xlabel("case")
    bars.set_ylabel("latency (ms, log scale)")
    bars.set_title("p50 / p90 / p99")
    bars.grid(True, axis="y", which="both", alpha=0.3)
    bars.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
