"""The README's embedding example is code a user will paste: run it.  Its
API signatures are checked against the code, so they cannot drift."""

import ast
import inspect
import pathlib
import re

import tunrelay
from conftest import load_fastpath

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STUB = ROOT / "tunrelay" / "_fastpath.pyi"


def test_embedding_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = [b for b in blocks if "Pump(" in b]
    assert example, "README lost its embedding example"
    namespace: dict = {}
    exec(compile(example[0], "README.md", "exec"), namespace)
    assert namespace["outcome"].reason == "stopped"
    assert namespace["pump"].stats()["egress"]["packets"] == 1


# ---------------------------------------------------------------- the signatures block

def _signature_lines() -> list[str]:
    """The ```pyi block of "Embedding the fast path", continuation lines joined."""
    blocks = re.findall(r"```pyi\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "README should have one ```pyi block: the API signatures"
    lines: list[str] = []
    for line in blocks[0].splitlines():
        if line[:1].isspace():
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.strip())
    return lines


LINE = re.compile(r"(?:(?P<owner>\w+)\.)?(?P<name>\w+)(?:\((?P<params>.*)\))?"
                  r"(?:\s*->\s*(?P<returns>.+))?$")


def _shape(parameters) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in parameters]


def _written(params: str) -> list[tuple]:
    namespace: dict = {}
    exec(f"def written({params}): pass", namespace)
    return _shape(inspect.signature(namespace["written"]).parameters.values())


def _stub_members() -> dict[str, dict[str, ast.FunctionDef]]:
    """The stub's classes: member name -> its def (properties too)."""
    tree = ast.parse(STUB.read_text())
    return {node.name: {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
            for node in tree.body if isinstance(node, ast.ClassDef)}


#: What the block's "owner.member" lines name.
OWNERS = {"pump": "Pump", "keyring": "Keyring", "table": "PeerTable"}


def _real(owner: str | None, name: str):
    """What a README line names: (its signature's parameters without self,
    its return annotation as text, is it a property)."""
    stub = _stub_members()
    fastpath = load_fastpath()
    if owner in OWNERS:
        cls = OWNERS[owner]
        node = stub[cls][name]
        is_property = any(ast.unparse(d) == "property" for d in node.decorator_list)
        parameters = None
        if not is_property:
            # The compiled function itself, as inspect reads it.
            compiled = inspect.signature(getattr(getattr(fastpath, cls), name))
            parameters = list(compiled.parameters.values())[1:]
        return parameters, ast.unparse(node.returns), is_property
    if name in OWNERS.values():
        # __cinit__ has no signature inspect can read: the stub's __init__,
        # which tests/test_stubs.py holds to the .pyx and the compiled class.
        namespace: dict = {}
        init = stub[name]["__init__"]
        init.returns = None
        for arg in [*init.args.args, *init.args.kwonlyargs]:
            arg.annotation = None
        exec(compile(ast.Module([init], []), str(STUB), "exec"), namespace)
        return list(inspect.signature(namespace["__init__"]).parameters.values())[1:], None, False
    if owner == "relay":
        target = getattr(tunrelay.Relay, name)
        parameters = list(inspect.signature(target).parameters.values())[1:]
    else:
        target = getattr(tunrelay, name)
        parameters = list(inspect.signature(target).parameters.values())
    returns = inspect.signature(target).return_annotation
    if inspect.isclass(target):
        returns = None
    return parameters, None if returns is inspect.Signature.empty else returns, False


def test_the_readme_signatures_are_the_code():
    seen: set[tuple] = set()
    for line in _signature_lines():
        match = LINE.fullmatch(line)
        assert match, f"README signature line not understood: {line}"
        owner, name, params, returns = match.group("owner", "name", "params", "returns")
        parameters, real_returns, is_property = _real(owner, name)
        if is_property:
            assert params is None, f"{line}: {owner}.{name} is a property"
        else:
            assert params is not None, f"{line}: {owner}.{name} is a method"
            assert _written(params) == _shape(parameters), f"README: {line}"
        if real_returns is not None:
            assert returns == real_returns, f"README: {line}; the code returns {real_returns}"
        seen.add((owner, name))
    # Nothing public left out: every member of the extension's classes, and
    # the names an embedder starts from.
    stub = _stub_members()
    for owner, cls in OWNERS.items():
        public = {n for n in stub[cls] if not n.startswith("_")}
        assert public <= {n for o, n in seen if o == owner}, (
            f"README lacks {owner}.{sorted(public - {n for o, n in seen if o == owner})}")
    for name in ("Pump", "PyPump", "Keyring", "PeerTable", "Relay", "open_tun", "load_config",
                 "loads_config"):
        assert (None, name) in seen, f"README lacks {name}(...)"
