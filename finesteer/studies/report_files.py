"""The files a study writes (`finesteer eval`, `transfer`, `layers`): ``<name>.json`` (everything), ``<name>.md``
(the table) and ``<name>.png`` (the plot), in one folder, and pyplot without a display."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (plots are written to files; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_average() -> Optional[list]:
    """The machine's 1, 5 and 15-minute load averages (None where the platform has none): studies record them,
    since their timings on a shared machine mean little without."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_report(out_dir: str | os.PathLike, name: str, summary: dict, table: str,
                 draw: Callable[[Path], None]) -> dict:
    """Create ``out_dir`` if needed, write ``summary`` as JSON, ``table`` as markdown and ``draw(path)``'s plot;
    returns the paths under the keys ``json``, ``table`` and ``plot``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "table": out / f"{name}.md", "plot": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    paths["table"].write_text(table, encoding="utf-8")
    draw(paths["plot"])
    return paths
