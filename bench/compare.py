"""Before/after on cache hits (case 2), or misses (case 3, `--misses`): two broker source
trees, measured in alternation.

    git archive HEAD broker | tar -x -C /tmp/before    # before a change
    .venv/bin/python -m bench.compare /tmp/before [.] [--misses]

Both brokers run at once (idle while the other is measured); rounds alternate A, B, A, B...
so that a busy neighbour on a shared machine disturbs both alike. Prints the median requests/s
and server CPU seconds per 1,000 requests of each, and every round.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.run import grpc_spec, load, log
from bench.targets import BrokerProcess, EmulatorHost, free_port, write_broker_config

REPO = Path(__file__).resolve().parents[1]


def compare(a: Path, b: Path, rounds: int, requests: int, *, misses: bool = False) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="token-broker-compare-"))
    emulator = EmulatorHost(workdir)
    brokers: dict[str, BrokerProcess] = {}
    samples: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    try:
        for label, src in (("A", a), ("B", b)):
            port = free_port()
            config = write_broker_config(workdir, emulator.kubeconfig, cache=not misses, port=port)
            brokers[label] = BrokerProcess(config, workdir, port=port, src=src.resolve())
        for i in range(rounds):
            for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
                broker = brokers[label]
                result, cpu, _ = load(grpc_spec(broker.address, requests), broker.pids, None)
                samples[label].append((result.rate, cpu / result.ok * 1000))
                log(f"round {i + 1} {label}: {result.rate:.0f} req/s, {cpu / result.ok * 1000:.3f}")
    finally:
        for broker in brokers.values():
            broker.stop()
        emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        f"{'Cache misses' if misses else 'Cache hits'}, {rounds} alternating rounds of "
        f"{requests:,} requests each:",
        "",
        "| broker | median req/s | median server CPU s/1k req | rounds (req/s) |",
        "|---|---:|---:|---|",
    ]
    for label, src in (("A", a), ("B", b)):
        rates = [r for r, _ in samples[label]]
        cpus = [c for _, c in samples[label]]
        lines.append(
            f"| {label}: {src} | {statistics.median(rates):,.0f} | {statistics.median(cpus):.3f} "
            f"| {', '.join(f'{r:.0f}' for r in rates)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("a", type=Path, help="the tree holding broker/ (before)")
    parser.add_argument("b", type=Path, nargs="?", default=REPO, help="(after; this checkout)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=6_000)
    parser.add_argument("--misses", action="store_true", help="the cache off: every call a miss")
    args = parser.parse_args()
    print(compare(args.a, args.b, args.rounds, args.requests, misses=args.misses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
