"""Before/after on cache hits (case 2), or misses (case 3, `--misses`): two broker source
trees, measured in alternation.

    git archive HEAD broker | tar -x -C /tmp/before    # before a change
    .venv/bin/python -m bench.compare /tmp/before [.] [--misses] [--bare]

Both brokers run at once (idle while the other is measured); rounds alternate A, B, A, B...
so that a busy neighbour on a shared machine disturbs both alike. Prints the median requests/s
and server CPU seconds per 1,000 requests of each, and every round. `--bare` (cache hits)
measures the bare grpc.aio server of `make bench`'s case 1 in the same rotation, and each
broker's requests/s as a share of its, round by round (the ratio `make bench` targets).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.run import grpc_spec, load, log, one_response
from bench.targets import BareServer, BrokerProcess, EmulatorHost, free_port, write_broker_config

REPO = Path(__file__).resolve().parents[1]


def compare(
    a: Path, b: Path, rounds: int, requests: int, *, misses: bool = False, bare: bool = False
) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="token-broker-compare-"))
    emulator = EmulatorHost(workdir)
    brokers: dict[str, BrokerProcess | BareServer] = {}
    labels = ("A", "B", "bare") if bare else ("A", "B")
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    try:
        for label, src in (("A", a), ("B", b)):
            port = free_port()
            config = write_broker_config(workdir, emulator.kubeconfig, cache=not misses, port=port)
            brokers[label] = BrokerProcess(config, workdir, port=port, src=src.resolve())
        if bare:
            brokers["bare"] = BareServer(one_response(brokers["B"].address))
        for i in range(rounds):
            for label in labels if i % 2 == 0 else labels[::-1]:
                target = brokers[label]
                result, cpu, _ = load(grpc_spec(target.address, requests), target.pids, None)
                samples[label].append((result.rate, cpu / result.ok * 1000))
                log(f"round {i + 1} {label}: {result.rate:.0f} req/s, {cpu / result.ok * 1000:.3f}")
    finally:
        for target in brokers.values():
            target.stop()
        emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        f"{'Cache misses' if misses else 'Cache hits'}, {rounds} alternating rounds of "
        f"{requests:,} requests each:",
        "",
        "| broker | median req/s | median server CPU s/1k req | rounds (req/s) |",
        "|---|---:|---:|---|",
    ]
    names = {"A": f"A: {a}", "B": f"B: {b}", "bare": "bare grpc.aio server (ceiling)"}
    for label in labels:
        rates = [r for r, _ in samples[label]]
        cpus = [c for _, c in samples[label]]
        lines.append(
            f"| {names[label]} | {statistics.median(rates):,.0f} "
            f"| {statistics.median(cpus):.3f} | {', '.join(f'{r:.0f}' for r in rates)} |"
        )
    if bare:
        ceiling = [r for r, _ in samples["bare"]]
        lines += ["", "| broker | median share of the ceiling | rounds |", "|---|---:|---|"]
        for label in ("A", "B"):
            shares = [r / c for (r, _), c in zip(samples[label], ceiling, strict=True)]
            lines.append(
                f"| {names[label]} | {statistics.median(shares):.2f} "
                f"| {', '.join(f'{x:.2f}' for x in shares)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("a", type=Path, help="the tree holding broker/ (before)")
    parser.add_argument("b", type=Path, nargs="?", default=REPO, help="(after; this checkout)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=6_000)
    parser.add_argument("--misses", action="store_true", help="the cache off: every call a miss")
    parser.add_argument(
        "--bare", action="store_true", help="also the bare grpc.aio server: shares of it"
    )
    args = parser.parse_args()
    if args.bare and args.misses:
        parser.error("--bare compares cache hits")
    print(compare(args.a, args.b, args.rounds, args.requests, misses=args.misses, bare=args.bare))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
