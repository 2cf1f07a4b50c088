"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The Prometheus Operator reads alert rules from a ``PrometheusRule`` resource whose ``spec``
is the rule file itself. This copies the rule file's ``groups:`` text under ``spec:`` (so its
comments and block scalars stay as written); tests/unit/test_deploy.py checks that the
manifest is this script's output::

    python deploy/prometheus/to_prometheusrule.py          # rewrite the manifest
    python deploy/prometheus/to_prometheusrule.py --check  # exit 1 if it is out of date

Standard library only.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yml"
MANIFEST = HERE.parent / "k8s" / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/alerts.yml by deploy/prometheus/to_prometheusrule.py:
# edit the rule file and run the script, not this file.
#
# For the Prometheus Operator (kube-prometheus-stack). Many installations only pick up
# PrometheusRules carrying a particular label (e.g. release: <helm release name>): add it
# under metadata.labels if yours does, as for the ServiceMonitor.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: streamkm
  labels:
    app.kubernetes.io/name: streamkm
    app.kubernetes.io/component: daemon
spec:
"""


def render(alerts_text: str) -> str:
    """The manifest for a rule file's text: its ``groups:`` section indented under ``spec:``."""
    lines = alerts_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = [("  " + line) if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body).rstrip() + "\n"


def main(argv: list[str]) -> int:
    wanted = render(ALERTS.read_text(encoding="utf-8"))
    if argv == ["--check"]:
        current = MANIFEST.read_text(encoding="utf-8") if MANIFEST.exists() else ""
        if current != wanted:
            print(f"{MANIFEST} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    MANIFEST.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
