"""The user guide's code blocks run as written (slow: they train small models)."""

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "user-guide.md"


@pytest.mark.slow
def test_user_guide_code_blocks_run():
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 8
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), namespace)  # noqa: S102
    assert namespace["trust"].verdict == "pass"
    assert namespace["scores"].shape == (5, 400)
