"""The command line's arguments reach the commands."""

from __future__ import annotations

import pytest

from streamkm.cli import _parser

pytestmark = pytest.mark.unit


def test_produce_takes_the_csv_header_and_key_column_flags() -> None:
    args = _parser().parse_args(["produce", "--no-header", "--key-column", "id", "x.csv"])
    assert (args.header, args.key_column, args.source) == (False, "id", "x.csv")
    args = _parser().parse_args(["produce", "x.csv"])
    assert (args.header, args.key_column) == (None, None)  # detected; no key column
