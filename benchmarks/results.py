"""A GPU benchmark's results file: a dict written as JSON after every section, so a run cut by its
time limit keeps what finished, and a section that fails records its traceback instead of ending
the run (the device calls are few and short)."""

from __future__ import annotations

import json
import time
import traceback


class Results:
    def __init__(self, path: str):
        self.path = path  # main() sets it from --out
        self.data: dict = {}

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)

    def section(self, fn):
        """Decorator: fn(res, *a, **kw) fills data[fn.__name__]; errors and wall time recorded, saved."""
        def run(*a, **kw):
            t0 = time.time()
            res = self.data.setdefault(fn.__name__, {})
            try:
                fn(res, *a, **kw)
            except Exception:
                res["error"] = traceback.format_exc()[-3000:]
                print(res["error"], flush=True)
            res["wall_s"] = round(time.time() - t0, 1)
            self.save()
            print(f"== {fn.__name__} done in {res['wall_s']} s", flush=True)
        return run
