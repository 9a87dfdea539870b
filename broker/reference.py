"""The generated blocks of the documentation: reference text rendered from the code, never copied.

A page of docs/ holds a generated block between two markers:

    <!-- BEGIN GENERATED: name -->
    ...
    <!-- END GENERATED: name -->

`BLOCKS` says which render function fills which block of which page; one more generated block
is one more line there. `python -m broker.reference` (`make docs-gen`) rewrites every block,
`--check` lists the stale ones (a test runs it: a block that no longer says what the code
says fails the suite).

What is rendered: the configuration reference from the settings model (broker/config.py:
keys, defaults, TOKEN_BROKER_* variables, `serve` flags, the fields' own comments), the
metrics reference from a fresh broker's metric registry (broker/metrics.py), the table of
ErrorInfo reasons from their catalogue (broker/reasons.py), files the docs show (the example
policy, the dev policy, the gRPC service config) and the real output of `token-broker policy
explain` on the docs' example policy.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import re
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from prometheus_client.registry import CollectorRegistry
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from broker import http_errors, reasons
from broker.config import MetricsSettings, Settings, env_var_name
from broker.filemodes import FileMode

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Block:
    """One generated block: `render()` is what goes between the markers named `name` in `page`
    (a path relative to the repository's root)."""

    page: str
    name: str
    render: Callable[[], str]


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED: {name} -->"


# --- files shown as they are ----------------------------------------------------------------


def fenced_file(path: str, language: str) -> Callable[[], str]:
    """A file of the repository in a fenced block, so the text and the file are one."""

    def render() -> str:
        text = (ROOT / path).read_text(encoding="utf-8").rstrip("\n")
        return f"`{path}`:\n\n```{language}\n{text}\n```\n"

    return render


# --- the configuration reference -------------------------------------------------------------


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment lines right above each field of `model`'s class body (its own words)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(model).splitlines():
        stripped = line.strip()
        if line.startswith("    #") and not line.startswith("     "):
            pending.append(stripped.lstrip("#").strip())
            continue
        field = re.match(r"^    (\w+): ", line)
        if field is not None and field.group(1) in model.model_fields:
            comments[field.group(1)] = " ".join(pending)
        pending = []
    return comments


def _doc(model: type[BaseModel]) -> str:
    """The first paragraph of a section's docstring, on one line."""
    doc = inspect.getdoc(model) or ""
    if model.__doc__ is None or doc == inspect.getdoc(BaseModel):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _section(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section model in an annotation, whether it is a list of them)."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        inner, listed = _section(typing.get_args(annotation)[0])
        return inner, True if inner is not None else listed
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate, False
    return None, False


def _literal_choices(annotation: Any) -> tuple[str, ...]:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return tuple(str(a) for a in typing.get_args(arg))
    return ()


def _value(value: Any, file_mode: bool = False) -> str:
    if value is None:
        return "`null`"
    if file_mode and isinstance(value, int):
        return f"`{value:04o}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json", by_alias=True)
        flow = yaml.safe_dump(dumped, default_flow_style=True, sort_keys=False, width=10_000)
        return f"`{flow.strip()}`"
    if isinstance(value, tuple | list):
        return "`[]`" if not value else "`" + json.dumps(list(value)) + "`"
    return f"`{value}`"


def serve_flags() -> dict[str, list[str]]:
    """Settings key -> the `serve` flags that set it, found by giving each flag to the parser
    and reading the settings it yields (`--kubeconfig (sets kubeconfig)`: a fixed value)."""
    from broker.cli import build_parser
    from broker.cli.serve import serve_overrides

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    found: dict[str, list[str]] = {}
    for action in serve._actions:
        flags = [s for s in action.option_strings if s.startswith("--")]
        if not flags or flags[0] in ("--help", "--config", "--workers"):
            continue
        flag = flags[0]
        sample = "127.0.0.1:1" if action.metavar == "HOST:PORT" else "SAMPLE"
        argv = ["serve", flag] if action.nargs == 0 else ["serve", flag, sample]
        if action.choices:
            argv = ["serve", flag, str(next(iter(action.choices)))]
        given = argv[-1] if action.nargs != 0 else True
        for key, value in _flatten(serve_overrides(parser.parse_args(argv))):
            shown = f"`{flag}`"
            if str(value) != str(given) and not (action.choices and value in action.choices):
                shown += f" (sets `{value}`)"
            found.setdefault(key, []).append(shown)
    return found


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def settings_reference() -> str:
    """One row per setting: key, default, environment variable, flag, meaning."""
    flags = serve_flags()
    rows = [
        "| key | default | environment variable | `serve` flag | meaning |",
        "|---|---|---|---|---|",
    ]

    def walk(
        model: type[BaseModel], default: BaseModel | None, path: tuple[str, ...], listed: bool
    ) -> None:
        comments = _field_comments(model)
        for name, info in model.model_fields.items():
            key = info.alias or to_camel(name)
            here = (*path, key)
            dotted = ".".join(here).replace(".[]", "[]")
            section, is_list = _section(info.annotation)
            if default is not None:
                value = getattr(default, name)
            elif info.is_required():
                value = ...
            else:
                value = info.get_default(call_default_factory=True)
            file_mode = any(isinstance(m, FileMode) for m in info.metadata)
            # A field's own description, else the comment above it.
            meaning = info.description or comments.get(name, "")
            choices = _literal_choices(info.annotation)
            if choices:
                meaning = (
                    (meaning + " " if meaning else "")
                    + "One of "
                    + ", ".join(f"`{c}`" for c in choices)
                    + "."
                )
            if section is not None and not is_list and isinstance(value, BaseModel | None):
                nullable = type(None) in typing.get_args(info.annotation)
                lead = _doc(section)
                if nullable:
                    shown = "none" if value is None else _value(value)
                    row_meaning = " ".join(filter(None, [meaning, lead, "`null`: none."]))
                    rows.append(_row(dotted, shown, here, listed, flags, row_meaning))
                elif lead and not meaning:
                    meaning = lead
                walk(section, value if isinstance(value, BaseModel) else None, here, listed)
                continue
            if value is ...:
                shown = "required"
            elif value is None:
                shown = "none"
            else:
                shown = _value(value, file_mode)
            rows.append(_row(dotted, shown, here, listed, flags, meaning))
            if section is not None and is_list:
                walk(section, None, (*here, "[]"), True)

    walk(Settings, Settings.model_construct(), (), False)
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(
    dotted: str,
    shown: str,
    path: tuple[str, ...],
    listed: bool,
    flags: dict[str, list[str]],
    meaning: str,
) -> str:
    env = "" if listed else f"`{env_var_name(path)}`"
    flag = ", ".join(flags.get(dotted, []))
    return f"| `{dotted}` | {shown} | {env} | {flag} | {_cell(meaning)} |"


# --- the metrics reference -------------------------------------------------------------------


class _Stats:
    hits = misses = redis_failures = local_checks = 0


class _Memo:
    stats = _Stats()

    def __len__(self) -> int:
        return 0


class _Audit:
    lost_lines = written_lines = pending_lines = 0

    def problem(self) -> str | None:
        return None


class _Limiter:
    redis_available: bool | None = True
    stats = _Stats()

    def size(self) -> int:
        return 0


@dataclass
class _File:
    what: str
    paths: tuple[Path, ...]
    reload_count: int = 0
    reload_failures: int = 0
    last_error: str | None = None


def broker_registry(settings: MetricsSettings) -> CollectorRegistry:
    """A fresh broker's registry with every family present: what is read when scraped wired to
    idle stand-ins (a broker serving TLS, with a rate limiter on Redis and a followed file)."""
    from broker.metrics import BrokerMetrics

    metrics = BrokerMetrics(settings)
    state = metrics._state
    state.memo = _Memo()
    state.audit = _Audit()
    state.ready = lambda: True
    state.kubernetes_api_last_success = lambda: None
    state.rate_limiter = _Limiter()
    state.files = lambda: [_File("policy", (Path("policy.yaml"),))]
    state.certificate_expiry = lambda: datetime(2030, 1, 1, tzinfo=UTC)
    return metrics.registry


_SUFFIXES = {"counter": "_total", "histogram": "", "gauge": "", "info": "_info"}


def metric_families(registry: CollectorRegistry) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """name -> (type, help, label names) of every family the registry exposes."""
    labels_of: dict[str, tuple[str, ...]] = {}
    for collector in list(registry._collector_to_names):
        names = getattr(collector, "_labelnames", None)
        own = getattr(collector, "_name", None)
        if names is not None and own is not None:
            labels_of[own] = tuple(names)
    out: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for family in registry.collect():
        names = labels_of.get(family.name, getattr(family, "_labelnames", ()))
        if not names:
            seen = {k for s in family.samples for k in s.labels if k not in ("le", "quantile")}
            names = tuple(sorted(seen))
        out[family.name + _SUFFIXES.get(family.type, "")] = (
            family.type,
            " ".join(family.documentation.split()),
            tuple(names),
        )
    return out


def metrics_reference() -> str:
    """Three tables (gRPC server, the broker, the process), from a fresh broker's registry."""
    plain = metric_families(broker_registry(MetricsSettings()))
    with_callers = metric_families(broker_registry(MetricsSettings(caller_labels=True)))
    groups: dict[str, list[str]] = {"grpc_": [], "token_broker_": [], "": []}
    for name, (kind, help_text, labels) in plain.items():
        shown = [f"`{label}`" for label in labels]
        shown += [
            f"`{label}` (with `metrics.callerLabels`)"
            for label in with_callers[name][2]
            if label not in labels
        ]
        row = f"| `{name}` | {kind} | {', '.join(shown)} | {_cell(help_text)} |"
        prefix = next(p for p in groups if name.startswith(p))
        groups[prefix].append(row)
    titles = {
        "grpc_": "**gRPC server** (`grpc_server_*`)",
        "token_broker_": "**The broker** (`token_broker_*`)",
        "": "**The process** (prometheus_client's own collectors: `process_*`, `python_*`)",
    }
    parts = []
    for prefix, rows in groups.items():
        header = "| name | type | labels | help |\n|---|---|---|---|\n"
        parts.append(f"{titles[prefix]}:\n\n{header}" + "\n".join(rows) + "\n")
    return "\n".join(parts)


# --- `token-broker policy explain` on the example policy -------------------------------------

EXAMPLE_POLICY = "docs/examples/policy.yaml"
EXPLAIN_EXAMPLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "a GitHub Actions job (a JWT) asks for 2h: allowed, for 1h (the rule caps it, with a "
        "warning)",
        (
            "--method", "jwt", "--issuer", "https://token.actions.githubusercontent.com",
            "--subject", "repo:example/app:ref:refs/heads/main",
            "--claim", "repository_owner=example", "--claim", "ref=refs/heads/main",
            "-n", "ci", "deployer", "--audience", "vault", "--duration", "2h",
            "--bound-object-kind", "Pod", "--bound-object-name", "web-0",
        ),
    ),
    (
        "the same job without a bound object: denied (the rule requires a Pod-bound token)",
        (
            "--method", "jwt", "--issuer", "https://token.actions.githubusercontent.com",
            "--subject", "repo:example/app:ref:refs/heads/main",
            "--claim", "repository_owner=example", "--claim", "ref=refs/heads/main",
            "-n", "ci", "deployer", "--audience", "vault",
        ),
    ),
    (
        "a client certificate whose URI SAN is spiffe://example.org/ci/runner "
        "(docs/examples/client.crt): allowed",
        (
            "--certificate", "docs/examples/client.crt", "-n", "ci", "deployer",
            "--audience", "vault", "--bound-object-kind", "Pod", "--bound-object-name", "web-0",
        ),
    ),
    (
        "a certificate known by a DNS name: denied on purpose, the rule's mtls subject matches "
        "the URI SAN only; the output says so for each subject",
        ("--subject", "runner.example", "--field", "dns", "-n", "ci", "deployer"),
    ),
)  # fmt: skip


def _run_cli(argv: Sequence[str]) -> tuple[int, str]:
    from broker.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def _shell_words(argv: Sequence[str]) -> str:
    """The command as one would type it, continued on a new line before a flag past 80 columns."""
    lines, line = [], "token-broker"
    for word in argv:
        quoted = word if re.fullmatch(r"[\w@%+=:,./-]+", word) else f"'{word}'"
        if word.startswith("-") and len(line) + 1 + len(quoted) > 80:
            lines.append(line + " \\")
            line = "    " + quoted
        else:
            line += " " + quoted
    lines.append(line)
    return "\n".join(lines)


def explain_examples() -> str:
    """Each example: the command (a block the docs' tests run and expect this exit status of)
    and what it printed when the docs were generated."""
    parts = []
    with contextlib.chdir(ROOT):
        validate = ("policy", "validate", EXAMPLE_POLICY)
        code, out = _run_cli(validate)
        parts.append(
            f"<!-- test: dev; exit {code} -->\n```sh\n{_shell_words(validate)}\n```\n\n"
            f"```text\n{out.rstrip()}\n```\n"
        )
        for title, args in EXPLAIN_EXAMPLES:
            argv = ("policy", "explain", "--policy", EXAMPLE_POLICY, *args)
            code, out = _run_cli(argv)
            parts.append(
                f"{title[0].upper()}{title[1:]} (exit {code}):\n\n"
                f"<!-- test: dev; exit {code} -->\n```sh\n{_shell_words(argv)}\n```\n\n"
                f"```text\n{out.rstrip()}\n```\n"
            )
    return "\n".join(parts)


# --- the registry ----------------------------------------------------------------------------

BLOCKS: tuple[Block, ...] = (
    Block("docs/configuration.md", "settings", settings_reference),
    Block("docs/metrics.md", "metrics", metrics_reference),
    Block("docs/troubleshooting.md", "reasons", reasons.markdown_table),
    Block("docs/http-door.md", "http-errors", http_errors.markdown_table),
    Block("docs/policy.md", "example-policy", fenced_file(EXAMPLE_POLICY, "yaml")),
    Block("docs/policy.md", "policy-explain", explain_examples),
    Block("docs/getting-started.md", "dev-policy", fenced_file("broker/dev-policy.yaml", "yaml")),
    Block("docs/clients.md", "service-config", fenced_file("clients/service-config.json", "json")),
)


def fill(text: str, name: str, content: str, page: str) -> str:
    """`text` with the block `name` holding `content` (the markers must be there, once)."""
    begin, end = begin_marker(name), end_marker(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{page}: expected one {begin} and one {end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{content.strip(chr(10))}\n{end}{tail}"


def generate(root: Path = ROOT, blocks: Sequence[Block] = BLOCKS) -> dict[Path, str]:
    """Every page with a generated block, as it should read."""
    pages: dict[Path, str] = {}
    for block in blocks:
        path = root / block.page
        text = pages.get(path) or path.read_text(encoding="utf-8")
        pages[path] = fill(text, block.name, block.render(), block.page)
    return pages


def stale(root: Path = ROOT, blocks: Sequence[Block] = BLOCKS) -> list[str]:
    """The blocks whose page does not say what the code says now ("page: name")."""
    pages = generate(root, blocks)
    out = []
    for block in blocks:
        path = root / block.page
        current = path.read_text(encoding="utf-8")
        begin, end = begin_marker(block.name), end_marker(block.name)
        want = pages[path].split(begin)[1].split(end)[0]
        if current.split(begin)[1].split(end)[0] != want:
            out.append(f"{block.page}: {block.name}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.reference", description="Rewrite the docs' generated blocks."
    )
    parser.add_argument("--check", action="store_true", help="list stale blocks, exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for entry in found:
            print(f"stale: {entry}")
        return 1 if found else 0
    for path, text in generate().items():
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
