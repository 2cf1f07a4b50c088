"""Extract the PromQL expressions of the Grafana dashboard and of the Prometheus alert rules.

Used by the tests to check that every expression names only metrics streamkm exports and,
against a live Prometheus, that every expression returns data. Standard library only, so
it runs anywhere the tests do::

    python deploy/queries.py deploy/grafana/streamkm.json deploy/prometheus/alerts.yml

Grafana's built-in interval variables (``$__rate_interval``, ``$__interval``, ``$__range``)
become ``1m``, which is what Grafana computes for a 15 s scrape interval. Dashboard template
variables become their "All" value (``allValue``, else ``.*``) when they allow "All", and
their current value otherwise, so the expressions are plain PromQL Prometheus can run.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["GRAFANA_INTERVAL", "alert_exprs", "dashboard_exprs", "metric_names", "rule_exprs"]

#: What Grafana's interval variables are replaced with.
GRAFANA_INTERVAL = "1m"

_BUILTIN_INTERVALS = ("__rate_interval", "__interval", "__range")
_METRIC_NAME = re.compile(r"\bstreamkm_[a-z_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _template_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """The value each dashboard template variable stands for when the expression runs."""
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var.get("name")
        if not name:
            continue
        if var.get("includeAll"):
            values[name] = var.get("allValue") or ".*"
            continue
        current = var.get("current", {}).get("value", "")
        if isinstance(current, list):
            current = "|".join(current) if len(current) != 1 else current[0]
        values[name] = str(current)
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's $var, ${var} and [[var]] forms; unknown variables are left as they are."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in _BUILTIN_INTERVALS:
            return GRAFANA_INTERVAL
        return values.get(name, match.group(0))

    # ${name} or ${name:format}; [[name]]; $name. The longest names win in the plain form
    # because the identifier pattern is greedy.
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


def dashboard_exprs(path: str | Path) -> list[str]:
    """Every PromQL expression of the dashboard's panel targets, in panel order, runnable as is."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    # A dashboard exported for sharing wraps the model in {"dashboard": ...}.
    dashboard = dashboard.get("dashboard", dashboard)
    values = _template_values(dashboard)
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                exprs.append(_substitute(expr, values).strip())
    return exprs


def _rules(path: str | Path) -> list[dict[str, Any]]:
    # Imported here so that dashboard_exprs works without PyYAML.
    import yaml

    document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return [rule for group in document.get("groups", []) for rule in group.get("rules", [])]


def alert_exprs(path: str | Path) -> list[str]:
    """The expression of every alerting rule in a Prometheus rule file, in file order."""
    return [str(rule["expr"]).strip() for rule in _rules(path) if "alert" in rule]


def rule_exprs(path: str | Path) -> dict[str, str]:
    """Alert or record name → expression, for messages that name the failing rule."""
    return {
        str(rule.get("alert") or rule.get("record")): str(rule["expr"]).strip()
        for rule in _rules(path)
    }


def metric_names(expr: str) -> set[str]:
    """streamkm metric names an expression reads, with histogram series suffixes removed.

    Only the suffixes of histogram series are stripped (``_bucket``, ``_count``, ``_sum``);
    ``_total`` stays, since it is part of a counter's exported name.
    """
    names = set()
    for name in _METRIC_NAME.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python deploy/queries.py FILE.json|FILE.yml ...", file=sys.stderr)
        return 2
    for arg in argv:
        exprs = dashboard_exprs(arg) if arg.endswith(".json") else alert_exprs(arg)
        for expr in exprs:
            print(" ".join(expr.split()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
