"""The README documents every diffusion parameter with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_dllm.param_docs import DLLM_PARAM_DOCS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_parameter_table_matches_config():
    rows = dict(re.findall(r"^\| `(dllm_\w+)` \| ([^|]+) \|", README.read_text(), re.MULTILINE))
    assert set(rows) == set(DLLM_PARAM_DOCS)
    for name, (default, _) in DLLM_PARAM_DOCS.items():
        shown = rows[name].strip().strip("`")
        assert shown == ("none" if default is None else str(default)), name
