"""sm_90 compile checks on a machine without a GPU: ptxas's register / spill report of a kernel's
PTX (the ptxas that ships with the installed triton), for the scripts' --check-compile modes."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str) -> str:
    """'N bytes spill stores, Used R registers' for each kernel in the PTX ('' without a ptxas)."""
    if not os.path.exists(PTXAS):
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", fh.name, "-o", os.devnull], capture_output=True, text=True)
    return ", ".join(re.findall(r"(\d+ bytes spill stores|Used \d+ registers)", r.stdout + r.stderr))
