"""The extension's type stubs (tunrelay/_fastpath.pyi) against the
extension, and an embedder's code against the stubs.

The stubs cannot drift: every public name of the compiled module and of
its classes is in them and nothing else, each method has the compiled
one's parameters, and each constructor is the ``__cinit__`` of the .pyx.
Cython exposes no signature for ``__cinit__`` (``inspect.signature`` of
the class finds none, and it has no ``__text_signature__`` nor an
embedded one in ``__doc__``), so that one is read from the source the
extension is built from, and the compiled class is then called with every
keyword the stub names.
"""

from __future__ import annotations

import fnmatch
import inspect
import io
import pathlib
import subprocess
import sys
import tokenize
import tomllib

import pytest

from conftest import load_fastpath
from tunrelay import framing
from tunrelay.pypump import PyPump

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tunrelay"
STUB = PACKAGE / "_fastpath.pyi"
#: Where each class's __cinit__ is written.
SOURCES = {"Pump": PACKAGE / "_fastpath.pyx", "Keyring": PACKAGE / "_aead.pxi",
           "PrefixTable": PACKAGE / "_fastpath.pyx", "PeerTable": PACKAGE / "_peers.pxi"}
#: What tests/embedder.py is checked with, besides the stubs: the typed core.
TYPED_CORE = ["pumps.py", "pypump.py", "_runner.py", "errors.py", "framing.py", "aead.py", "aio.py",
              "counters.py"]


def _stub() -> dict:
    """The stub, executed: classes whose members inspect can read."""
    namespace: dict = {"__name__": "tunrelay._fastpath_stub"}
    exec(compile(STUB.read_text(), str(STUB), "exec"), namespace)
    return namespace


def _shape(signature: inspect.Signature) -> list[tuple]:
    """A signature without annotations (the compiled code has none)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_") or n in ("__enter__", "__exit__")}


def _cinit_signature(class_name: str) -> inspect.Signature:
    """The parameters of ``cdef class <class_name>``'s ``__cinit__`` in the
    .pyx, its C types dropped (``int mtu=1400`` -> ``mtu=1400``)."""
    text = SOURCES[class_name].read_text()
    start = text.index("def __cinit__(", text.index(f"cdef class {class_name}"))
    tokens = tokenize.generate_tokens(io.StringIO(text[start + len("def __cinit__("):]).readline)
    params, current, depth = [], [], 0
    for token in tokens:
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            if depth == 0:
                params.append(current)
                break
            depth -= 1
        elif token.type == tokenize.OP and token.string == "," and depth == 0:
            params.append(current)
            current = []
            continue
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            current.append(token)
    python = []
    for param in params:
        strings = [t.string for t in param]
        cut = strings.index("=") if "=" in strings else len(strings)
        name = "".join(strings[:cut][-2:]) if strings[:cut][-2:-1] == ["**"] else strings[cut - 1]
        default = "".join(t.string for t in param[cut:]) if cut < len(strings) else ""
        python.append(name + default)
    namespace: dict = {}
    exec(f"def __cinit__({', '.join(python)}): pass", namespace)
    signature = inspect.signature(namespace["__cinit__"])
    assert next(iter(signature.parameters)) == "self"
    return signature


# ---------------------------------------------------------------- the stub is the extension

def test_the_stub_names_exactly_the_public_names_of_the_extension():
    fastpath = load_fastpath()
    compiled = {name for name in _public(dir(fastpath))
                if getattr(getattr(fastpath, name), "__module__", None) == fastpath.__name__}
    stub = _stub()
    declared = {name for name in _public(stub)
                if getattr(stub[name], "__module__", None) == "tunrelay._fastpath_stub"}
    assert compiled == declared, (
        f"in the extension, not in _fastpath.pyi: {sorted(compiled - declared)}; "
        f"in _fastpath.pyi, not in the extension: {sorted(declared - compiled)}")


@pytest.mark.parametrize("class_name", sorted(SOURCES))
def test_each_class_of_the_stub_has_the_compiled_members(class_name):
    compiled = getattr(load_fastpath(), class_name)
    stub = _stub()[class_name]
    assert _public(vars(compiled)) == _public(vars(stub)) - {"__init__"}, (
        f"{class_name}: members differ from _fastpath.pyi")
    for name in _public(vars(stub)) - {"__init__"}:
        declared, real = vars(stub)[name], vars(compiled)[name]
        if isinstance(declared, property):
            assert not callable(real), f"{class_name}.{name} is a method, the stub says a property"
        else:
            assert callable(real), f"{class_name}.{name} is not a method in the extension"
            assert _shape(inspect.signature(real)) == _shape(inspect.signature(declared)), (
                f"{class_name}.{name}")


def test_the_module_functions_of_the_stub_have_the_compiled_signatures():
    fastpath, stub = load_fastpath(), _stub()
    for name in ("validate", "clamp_mss", "len16_split"):
        assert _shape(inspect.signature(getattr(fastpath, name))) == _shape(
            inspect.signature(stub[name])), name


@pytest.mark.parametrize("class_name", sorted(SOURCES))
def test_each_constructor_of_the_stub_is_the_cinit_of_the_source(class_name):
    compiled = getattr(load_fastpath(), class_name)
    with pytest.raises(ValueError, match="no signature found"):
        inspect.signature(compiled)   # the day Cython exposes it, compare with it instead
    stub = inspect.signature(_stub()[class_name].__init__)
    assert _shape(stub) == _shape(_cinit_signature(class_name))


def test_the_compiled_pump_takes_every_keyword_of_the_stub(tmp_path):
    import socket
    Pump = load_fastpath().Pump
    stub = inspect.signature(_stub()["Pump"].__init__)
    keywords = {n: p.default for n, p in stub.parameters.items() if p.kind is p.KEYWORD_ONLY}
    tun_end, app_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pump = Pump(tun_end, sock, **keywords)
        assert (pump.mode, pump.mtu, pump.batch, pump.offload) == (
            keywords["mode"], keywords["mtu"], keywords["batch"], keywords["offload"])
        with pytest.raises(TypeError):
            Pump(tun_end, sock, **keywords, not_a_keyword=None)
        del pump
    finally:
        for end in (tun_end, app_end, sock):
            end.close()


def test_the_python_pump_has_the_constructor_of_the_stub():
    stub = inspect.signature(_stub()["Pump"].__init__)
    assert _shape(inspect.signature(PyPump.__init__)) == _shape(stub)
    assert stub.parameters["mtu"].default == framing.DEFAULT_MTU


# ---------------------------------------------------------------- an embedder, type-checked

def test_an_embedder_type_checks_against_the_stubs(tmp_path):
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is missing: it is one of the test extras "
                    "(.venv/bin/pip install -e '.[test]')", pytrace=False)
    files = [str(ROOT / "tests" / "embedder.py"), str(STUB),
             *(str(PACKAGE / name) for name in TYPED_CORE)]
    # silent: the daemon's modules (tunrelay.daemon: config, device...) are
    # named in tunrelay/__init__.py for type checkers but not held to types
    # yet; the files named here are.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "--follow-imports=silent",
         "--warn-unused-ignores", "--no-color-output", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_embedder_runs():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import embedder
    finally:
        sys.path.remove(str(ROOT / "tests"))
    embedder.main()


def test_the_package_ships_its_types_and_its_sources():
    # PEP 561: py.typed and the stubs go into the wheel; the .pxi files into
    # the sdist (the .pyx includes them).  `pip wheel . --no-deps` and a
    # listing of the wheel show them; this is the cheap check of the patterns.
    assert (PACKAGE / "py.typed").is_file()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["tunrelay"]
    for path in [PACKAGE / "py.typed", STUB, *PACKAGE.glob("*.pxi")]:
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), path.name
