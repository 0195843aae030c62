"""remotefit/table.py: the one table formatter (`inv status`, `inv runs`, `inv check`)."""

from __future__ import annotations

from remotefit.nodes import status_table
from remotefit.table import table


def test_columns_are_as_wide_as_their_widest_cell_two_spaces_apart_without_trailing_spaces() -> None:
    rows = [("rf-test-0", "running", ""), ("rf-test-10", "stopped", "-")]
    assert table(rows, ("node", "state", "cost so far")) == [
        "node        state    cost so far",
        "rf-test-0   running",
        "rf-test-10  stopped  -",
    ]


def test_no_rows_is_the_header_alone() -> None:
    assert table([], ("run", "where")) == ["run  where"]


def test_the_status_table_has_its_columns_in_the_rows_order_and_no_lines_for_no_rows() -> None:
    assert status_table([]) == []
    assert status_table([{"node": "rf-x-0", "id": "i-1"}, {"node": "rf-x-1", "id": "i-22"}]) == [
        "node    id",
        "rf-x-0  i-1",
        "rf-x-1  i-22",
    ]
