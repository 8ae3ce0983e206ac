"""The 39 kinds of broken data lines of `bench/hostile/data_lines.py`, each as a test: named
`file:line: reason` (and skipped and counted with skip_bad_records), or read with its content
intact. The size-bound kind runs with a 1 MiB bound instead of 64 MiB."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lorakit.data import records

pytestmark = pytest.mark.slow  # needs the converted default model's tokenizer

_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "hostile" / "data_lines.py"
_spec = importlib.util.spec_from_file_location("hostile_data_lines", _SCRIPT)
campaign = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(campaign)


def test_the_campaign_has_39_kinds():
    assert len(campaign.KINDS) == 39
    assert len({kind.name for kind in campaign.KINDS}) == 39


@pytest.mark.parametrize("kind", campaign.KINDS, ids=[kind.name for kind in campaign.KINDS])
def test_each_kind_is_named_with_its_line_or_read_correctly(kind, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 2**20, raising=False)
    good, what = campaign.classify(kind, tokenizer, tmp_path)
    assert good, what
