"""The QWEN3NEXT_* switches: one table (env_switches.py) that every read goes through, bad values
refused with a message naming the accepted ones, the CLI refusing them in one line, and the
table matching docs/structure.md's."""

from __future__ import annotations

import pathlib
import re

import pytest

from qwen3next import cli
from qwen3next.env_switches import SWITCHES, check_all, switch

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_SWITCHES = {"QWEN3NEXT_API_KEY"}  # a value, not a switch


def test_default_accepted_and_refused(monkeypatch):
    monkeypatch.delenv("QWEN3NEXT_MOE_SORTED", raising=False)
    assert switch("QWEN3NEXT_MOE_SORTED") == "auto"
    monkeypatch.setenv("QWEN3NEXT_MOE_SORTED", "persistent")
    assert switch("QWEN3NEXT_MOE_SORTED") == "persistent"
    monkeypatch.setenv("QWEN3NEXT_MOE_SORTED", "persistant")
    with pytest.raises(ValueError, match=r"QWEN3NEXT_MOE_SORTED='persistant' is not one of .*'triton_gather'"):
        switch("QWEN3NEXT_MOE_SORTED")
    monkeypatch.setenv("QWEN3NEXT_KERNELS", "TORCH")  # read case-insensitively, as ops.py does
    assert switch("QWEN3NEXT_KERNELS") == "torch"
    monkeypatch.setenv("QWEN3NEXT_GDN_FUSED", "yes")
    with pytest.raises(ValueError, match="QWEN3NEXT_GDN_FUSED"):
        check_all()


def test_every_switch_read_in_the_package_is_in_the_table():
    names = set()
    for path in (ROOT / "qwen3next").rglob("*.py"):
        names |= set(re.findall(r"QWEN3NEXT_[A-Z0-9_]+", path.read_text()))
    assert names - NOT_SWITCHES <= set(SWITCHES), sorted(names - NOT_SWITCHES - set(SWITCHES))


def test_structure_md_lists_every_switch():
    doc = (ROOT / "docs" / "structure.md").read_text()
    table = doc[doc.index("## Environment switches"):]
    table = table[:table.index("\n## ", 1)]
    documented = set(re.findall(r"`(QWEN3NEXT_[A-Z0-9_]+)", table)) - NOT_SWITCHES
    assert documented == set(SWITCHES)


def test_cli_refuses_a_bad_switch_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QWEN3NEXT_ATTN_CUDNN", "on")
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "QWEN3NEXT_ATTN_CUDNN='on' is not one of '1', '0'" in err
