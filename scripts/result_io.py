"""One way for the scripts and benchmarks to report a result: print it, and write it as JSON when asked."""
from __future__ import annotations

import json
import os


def emit_json(result: dict, path: str = "") -> None:
    """Print ``result`` as indented JSON and, if ``path`` is given, write the same JSON there (parents created)."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
