"""Where a cache hit's CPU time goes (case 2): cProfile, or the py-spy sampling profiler.

`python -m bench.profile` (or `python -m bench --profile`): the broker runs as `python -m
cProfile -o FILE -m broker serve ...` (the event loop thread: the whole request path; the
audit writer thread is not profiled), the bench load sends cache hits, and the profile is
summarized per request: the functions with the most own time, and the cumulative time of the
request path's steps. Written to bench/results/profile.txt.

`python -m bench.profile --sampler py-spy`: the broker runs as it does in production and
py-spy samples it from outside (500 Hz, all threads, native frames left out): no cProfile
overhead on every call, and the other threads (the audit writer) and gRPC's own Cython code
show too. Summarized as shares of the samples: the request path's steps (cumulative), and
the functions with the most own time. Written to bench/results/profile-pyspy.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.run import CHANNELS, PROCESSES, RESULTS, grpc_spec, load, log
from bench.targets import BrokerProcess, EmulatorHost, free_port, write_broker_config

REQUESTS = 8_000

# The request path's steps (file suffix, function name), in order; then those of the request
# path before the hot-path redesign (for `--src` runs of an older tree).
STEPS = [
    ("broker/service.py", "CreateToken"),
    ("broker/request_path.py", "create_token"),
    ("broker/request_path.py", "_steps"),
    ("broker/receive.py", "receive"),
    ("broker/request_path.py", "_authenticate"),
    ("broker/authn.py", "authenticate"),
    ("broker/decision_memo.py", "get"),
    ("broker/request_path.py", "_decide"),
    ("broker/request_path.py", "_grant"),
    ("broker/cache.py", "fresh"),
    ("broker/request_path.py", "_hit"),
    ("broker/request_path.py", "_through_cache"),
    ("broker/cache.py", "get_or_fetch"),
    ("broker/upstream_guard.py", "slot"),
    ("broker/upstream.py", "create_token"),
    ("broker/upstream.py", "_attempt_once"),
    ("broker/upstream.py", "_outcome"),
    ("broker/audit.py", "line"),
    ("broker/audit.py", "write_line"),
    ("broker/audit.py", "for_call"),
    ("broker/audit.py", "to_json"),
    ("broker/request_path.py", "access_fields"),
    ("broker/observe.py", "log_access"),
    ("broker/logs.py", "direct_json_handler"),
    ("broker/logs.py", "json_line"),
    ("broker/logs.py", "write_direct"),
    ("broker/metrics.py", "token_handed_out"),
    ("broker/request_id.py", "request_id_from"),
    ("logging/__init__.py", "log"),
    ("broker/logs.py", "filter"),
    ("broker/logs.py", "format"),
    # before
    ("broker/observe.py", "unary_unary"),
    ("broker/observe.py", "finish"),
    ("broker/service.py", "_handle"),
    ("broker/service.py", "_create_token"),
    ("broker/validation.py", "validate_create_token"),
    ("broker/policy.py", "decide"),
    ("broker/policy.py", "effective_request"),
    ("broker/cache.py", "for_request"),
    ("broker/audit.py", "write"),
    ("broker/metrics.py", "token_issued"),
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


@contextlib.contextmanager
def _broker_on_emulator(
    workdir: Path, *, cache: bool, src: Path | None, python_args: tuple[str, ...] = ()
) -> Iterator[BrokerProcess]:
    """A broker process (from `src`) in front of an emulator; both stopped afterwards."""
    emulator = EmulatorHost(workdir)
    try:
        port = free_port()
        config = write_broker_config(workdir, emulator.kubeconfig, cache=cache, port=port)
        broker = BrokerProcess(config, workdir, port=port, python_args=python_args, src=src)
        try:
            yield broker
        finally:
            broker.stop()
    finally:
        emulator.stop()


def profile_hits(
    workdir: Path,
    out_dir: Path,
    requests: int = REQUESTS,
    *,
    src: Path | None = None,
    name: str = "profile.txt",
) -> Path:
    """Profile the broker in `src` (default: this checkout) on cache hits; write `name`."""
    prof = workdir / "broker.prof"
    cprofile = ("-m", "cProfile", "-o", str(prof))
    with _broker_on_emulator(workdir, cache=True, src=src, python_args=cprofile) as broker:
        log(f"profile: {requests} cache hits under cProfile")
        result, _, _ = load(grpc_spec(broker.address, requests), broker.pids, None)
    answered = result.ok + PROCESSES * CHANNELS  # and the warm-up calls
    text = summarize(prof, answered)
    target = out_dir / name
    target.write_text(text)
    print(text)
    return target


def _frame(frame: str) -> tuple[str, str]:
    """py-spy's 'function (path/file.py:line)' -> (function, path)."""
    function, _, where = frame.partition(" (")
    return function, where.rsplit(":", 1)[0]


# Leaf frames of threads that wait: an executor worker blocked on its queue, a thread blocked
# in C (gRPC's own pollers), the log writer waiting for lines. py-spy's idle detection misses
# them; they are not CPU time.
_WAITING = (
    "_worker (concurrent/futures/thread.py:81)",
    "Thread.run (threading.py:982)",
    "Condition.wait (threading.py:",
)


def summarize_pyspy(raw: Path, requests: int, seconds: float, what: str = "cache hits") -> str:
    """Shares of py-spy's samples (raw format: 'frame;frame;... count' per stack) of the
    event loop thread, where the request path runs, and what the other threads did."""
    own: Counter[str] = Counter()
    other: Counter[str] = Counter()
    steps: Counter[tuple[str, str]] = Counter()
    loop_total = other_total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if not any("run_forever" in f for f in frames):
            if not frames[-1].startswith(_WAITING):
                other_total += n
                other[frames[-1]] += n
            continue
        loop_total += n
        own[frames[-1]] += n
        seen = set()
        for frame in frames:
            function, path = _frame(frame)
            for suffix, name in STEPS:
                key = (suffix, name)
                if key not in seen and function.endswith(name) and path.endswith(suffix):
                    seen.add(key)
                    steps[key] += n
    out = io.StringIO()
    out.write(
        f"py-spy samples of the broker process (500 Hz, {seconds:.0f} s of load, "
        f"{requests:,} {what}): event loop thread {loop_total:,} samples, other threads "
        f"busy {other_total:,} (waiting threads left out)\n\n"
    )
    out.write("Request path steps, cumulative share of the event loop thread's samples:\n")
    for suffix, name in STEPS:
        if steps[(suffix, name)]:
            share = 100 * steps[(suffix, name)] / loop_total
            out.write(f"  {suffix}:{name:<24} {share:5.1f}%\n")
    out.write(
        "\nEvent loop thread, top 30 frames by own samples (gRPC's Cython and C code shows in "
        "asyncio's Handle._run):\n"
    )
    for frame, n in own.most_common(30):
        out.write(f"  {100 * n / loop_total:5.1f}%  {frame}\n")
    out.write("\nOther threads, busy (share of the event loop thread's sample count):\n")
    for frame, n in other.most_common(10):
        out.write(f"  {100 * n / loop_total:5.1f}%  {frame}\n")
    return out.getvalue()


def sample(
    workdir: Path,
    out_dir: Path,
    requests: int = REQUESTS,
    *,
    src: Path | None = None,
    misses: bool = False,
) -> Path:
    """py-spy over the broker in `src` (default: this checkout) on cache hits (case 2), or
    with `misses` on cache misses (case 3: the cache off, every call goes to the emulator)."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: make bench installs it (.[bench])")
    raw = workdir / "pyspy.txt"
    what = "cache misses" if misses else "cache hits"
    with _broker_on_emulator(workdir, cache=not misses, src=src) as broker:
        load(grpc_spec(broker.address, requests // 4), broker.pids, None)  # warm up
        log(f"profile: {requests} {what} sampled by py-spy")
        sampler = subprocess.Popen(
            [py_spy, "record", "--rate", "500", "--format", "raw", "--output", str(raw),
             "--pid", str(broker.pids[0])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # attached
        started = time.monotonic()
        result, _, _ = load(grpc_spec(broker.address, requests), broker.pids, None)
        seconds = time.monotonic() - started
        sampler.send_signal(2)  # SIGINT: py-spy writes what it has
        sampler.wait(60)
    text = summarize_pyspy(raw, result.ok, seconds, what)
    target = out_dir / ("profile-pyspy-misses.txt" if misses else "profile-pyspy.txt")
    target.write_text(text)
    print(text)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--src", type=Path, help="another tree holding broker/ (e.g. before)")
    parser.add_argument("--name", default="profile.txt", help="file name in bench/results")
    parser.add_argument("--sampler", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument(
        "--misses", action="store_true", help="py-spy only: the cache off, every call a miss"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="token-broker-profile-"))
    try:
        RESULTS.mkdir(parents=True, exist_ok=True)
        if args.sampler == "py-spy":
            sample(workdir, RESULTS, args.requests, src=args.src, misses=args.misses)
        else:
            profile_hits(workdir, RESULTS, args.requests, src=args.src, name=args.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
