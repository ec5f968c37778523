"""Join the JSON files of several `python -m diaglab.bench` runs (say the longest input
measured first, the shorter ones after) into one set of rows ordered by dtype, tokens and
mode: print their table and write --json / --csv / --html from them. Measures nothing.
Files from before the rows said num_mem_tokens (they say mem_tokens) are read too.

    python scripts/merge_reports.py data/bench/cpu_tiny.json data/bench/cpu_tiny_lengths.json \
        --html /tmp/cpu_tiny.html
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a plain checkout, no install

from diaglab.bench import OneLineParser, add_output_flags, check_outputs, read_rows, write_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = OneLineParser(prog="python scripts/merge_reports.py", description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", metavar="REPORT.json", help="JSON files that python -m diaglab.bench "
                   "--json wrote (one or more)")
    add_output_flags(p)
    args = p.parse_args(argv)
    missing = [path for path in args.reports if not Path(path).is_file()]
    if missing:
        p.error(f"no such file {', '.join(map(repr, missing))}: give the JSON files that "
                "python -m diaglab.bench --json wrote")
    check_outputs(p, args)
    try:
        rows = read_rows(args.reports)
    except ValueError as err:   # json.JSONDecodeError is one too
        p.error(f"{err}: give the JSON files that python -m diaglab.bench --json wrote")
    write_outputs(rows, args)
    return rows


if __name__ == "__main__":
    main()
