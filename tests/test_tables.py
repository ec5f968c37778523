"""The one table formatter: right-aligned columns as wide as their widest cell, the notes
after the rows; the evaluation report goes through it like the benchmark's."""

from diaglab import train
from diaglab.tables import format_table


def test_columns_align_and_notes_follow():
    text = format_table(["mode", "ms"], [["diagonal", "1.5"], ["full", "12.25"]], ["a note"])
    assert text.splitlines() == ["    mode     ms",
                                 "diagonal    1.5",
                                 "    full  12.25",
                                 "a note"]


def test_eval_table_rows_per_distance_then_summaries():
    result = {"tasks": ["recall"], "chance": 0.0625, "predictions_compared": 12, "diagonal_equals_sequential": True,
              "recall_at_distance_ge_4": None, "recall_zeroed_mean": 0.05,
              "by_distance": [{"distance": 1, "recall": 1.0, "recall_zeroed": 0.1},
                              {"distance": 2, "recall": 0.75, "recall_zeroed": 0.0}]}
    lines = train.eval_table(result).splitlines()
    assert [line.split() for line in lines[:3]] == [["distance", "recall", "recall_zeroed"],
                                                    ["1", "1.000", "0.100"], ["2", "0.750", "0.000"]]
    assert lines[3] == "recall: accuracy at distance >= 4 n/a, memory zeroed 0.050 (chance 0.062)"
    assert lines[4] == "diagonal == sequential on 12 predictions: True"
