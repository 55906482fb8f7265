"""The README's embedding example is code a user will paste: run it."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_embedding_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = [b for b in blocks if "Pump(" in b]
    assert example, "README lost its embedding example"
    namespace: dict = {}
    exec(compile(example[0], "README.md", "exec"), namespace)
    assert namespace["outcome"].reason == "stopped"
    assert namespace["pump"].stats()["egress"]["packets"] == 1
