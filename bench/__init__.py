"""Benchmarks of the broker (`make bench`, `python -m bench`); not part of `make test`.

bench.run orchestrates the cases (see its docstring), bench.loadgen is the load generator
(separate processes), bench.targets the processes under test (a bare gRPC server, the API-server
emulator host, the broker itself), bench.report the table, JSON and chart, bench.profile the
cProfile run of the cache-hit path. bench/ratelimit_eval.py is a separate study.
"""
