"""``python -m analysis sweep-html PREFIX.json``: draw a rank sweep written by
``python -m dirotq evaluate --sweep-ranks …`` as PREFIX.html (plotly.min.js beside it, offline)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .figures import sweep_figure, write_html


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("sweep-html", help="plot a rank-sweep result file as an offline HTML page")
    p.add_argument("results", help="the sweep's .json file")
    p.add_argument("--out", default=None, help="output .html (default: beside the .json)")
    args = ap.parse_args(argv)
    src = Path(args.results)
    if not src.is_file():
        print(f"python -m analysis sweep-html: error: no such file: {src}", file=sys.stderr)
        return 2
    try:
        results = json.loads(src.read_text())
        fig = sweep_figure(results)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        print(f"python -m analysis sweep-html: error: {src} is not a rank-sweep result ({type(err).__name__}: {err})",
              file=sys.stderr)
        return 2
    out = write_html(fig, args.out or src.with_suffix(".html"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
