"""The end-to-end demo on MovieLens-100k (``srp4ctr demo``)."""

from __future__ import annotations

import json
from pathlib import Path


def run_demo(out: str = "srp4ctr-demo", quick: bool = False, data_dir: str | None = None) -> dict:
    from srp4ctr import data

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = data.prepare("ml-100k", data_dir=data_dir)
    summary = {"data": ds.summary()}
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary
