"""cProfile of the broker on cache hits (case 2): where a request's CPU time goes.

`python -m bench.profile` (or `python -m bench --profile`): the broker runs as `python -m
cProfile -o FILE -m broker serve ...` (the event loop thread: the whole request path; the
audit writer thread is not profiled), the bench load sends cache hits, and the profile is
summarized per request: the functions with the most own time, and the cumulative time of the
request path's steps. Written to bench/results/profile.txt.
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import tempfile
from pathlib import Path

from bench.run import CHANNELS, PROCESSES, RESULTS, grpc_spec, load, log
from bench.targets import BrokerProcess, EmulatorHost, free_port, write_broker_config

REQUESTS = 8_000

# The request path's steps (file suffix, function name), in order.
STEPS = [
    ("broker/observe.py", "unary_unary"),
    ("broker/observe.py", "finish"),
    ("broker/service.py", "CreateToken"),
    ("broker/service.py", "_handle"),
    ("broker/service.py", "_create_token"),
    ("broker/authn.py", "authenticate"),
    ("broker/validation.py", "validate_create_token"),
    ("broker/policy.py", "decide"),
    ("broker/policy.py", "effective_request"),
    ("broker/cache.py", "for_request"),
    ("broker/cache.py", "get_or_fetch"),
    ("broker/audit.py", "for_call"),
    ("broker/audit.py", "write"),
    ("broker/audit.py", "to_json"),
    ("broker/metrics.py", "token_issued"),
    ("broker/request_id.py", "request_id_from"),
    ("logging/__init__.py", "log"),
    ("broker/logs.py", "filter"),
    ("broker/logs.py", "format"),
]


def summarize(prof: Path, requests: int) -> str:
    stats = pstats.Stats(str(prof))
    raw = stats.stats  # type: ignore[attr-defined]
    out = io.StringIO()
    per = 1e6 / requests
    out.write(f"cProfile of the broker's event loop thread, {requests:,} cache hits\n")
    out.write("(cProfile's own overhead inflates every number; compare them with each other)\n\n")
    out.write("Request path steps, cumulative µs per request:\n")
    for suffix, name in STEPS:
        total = 0.0
        calls = 0
        for (filename, _, func), (_, ncalls, _, cumtime, _) in raw.items():
            if func == name and filename.endswith(suffix):
                total += cumtime
                calls += ncalls
        if calls:
            out.write(
                f"  {suffix}:{name:<24} {total * per:8.1f} µs  ({calls / requests:.2f} calls/req)\n"
            )
    out.write("\nTop 30 functions by own time (µs per request):\n")
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:30]
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in rows:
        where = filename if filename.startswith("~") else "/".join(Path(filename).parts[-2:])
        out.write(
            f"  {tottime * per:8.1f} own {cumtime * per:8.1f} cum {ncalls / requests:6.2f}/req"
            f"  {where}:{line}({func})\n"
        )
    return out.getvalue()


def profile_hits(
    workdir: Path,
    out_dir: Path,
    requests: int = REQUESTS,
    *,
    src: Path | None = None,
    name: str = "profile.txt",
) -> Path:
    """Profile the broker in `src` (default: this checkout) on cache hits; write `name`."""
    emulator = EmulatorHost(workdir)
    prof = workdir / "broker.prof"
    try:
        port = free_port()
        config = write_broker_config(workdir, emulator.kubeconfig, cache=True, port=port)
        broker = BrokerProcess(
            config,
            workdir,
            port=port,
            python_args=("-m", "cProfile", "-o", str(prof)),
            src=src,
        )
        try:
            log(f"profile: {requests} cache hits under cProfile")
            result, _, _ = load(grpc_spec(broker.address, requests), broker.pids, None)
        finally:
            broker.stop()
    finally:
        emulator.stop()
    answered = result.ok + PROCESSES * CHANNELS  # and the warm-up calls
    text = summarize(prof, answered)
    target = out_dir / name
    target.write_text(text)
    print(text)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--src", type=Path, help="another tree holding broker/ (e.g. before)")
    parser.add_argument("--name", default="profile.txt", help="file name in bench/results")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="token-broker-profile-"))
    try:
        RESULTS.mkdir(parents=True, exist_ok=True)
        profile_hits(workdir, RESULTS, args.requests, src=args.src, name=args.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
