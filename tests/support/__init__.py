"""Helpers shared by the tests: plain functions, classes and constants, no fixtures (those are in
the conftest.py files) and no tests.

- `stack`: the real stack the tests drive: the emulator's seed, the broker's credential, the
  test callers and their policy, broker settings, requests and the errors they get.
- `emulator`: the emulator tests' own seed and names, Status bodies, JWT verification.
- `cli`: `python -m broker` as a child process, and throwaway PKI for TLS listeners.
- `client`: the client-side tests' scripted broker, child commands and agent helpers.
- `certs`: client certificates with chosen names, and policy rules for their subjects.
- `jwt_issuer`: a JWT signer with real keys, its JWKS file, an issuer's settings.
- `hardening`: a broker with its audit log in a file, hostile bearers, bounded values.
- `fuzz`: the brokers the boundary fuzz tests target, and raw gRPC calls.
- `redis_server`: a real redis-server, and a TLS front for it.
- `validation`: the invalid requests and the violations the broker reports for each.
- `suite_secrets`: what the suite-wide secrets scan collects all session.
"""
