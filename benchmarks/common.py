"""Small helpers the benchmark scripts share (printing and saving their result dicts)."""
from __future__ import annotations

import json
from typing import Optional


def emit(out: dict, json_path: Optional[str] = None) -> None:
    """Print ``out`` as indented JSON and, with ``json_path``, write the same JSON there."""
    text = json.dumps(out, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
