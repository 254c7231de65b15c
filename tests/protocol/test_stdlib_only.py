"""The protocol package is sans-IO: standard library only, and no I/O or logging modules."""

import ast
import sys
import types
from pathlib import Path

import erofs_nbdd.protocol

PACKAGE = Path(erofs_nbdd.protocol.__file__).parent
FORBIDDEN = {"socket", "ssl", "asyncio", "selectors", "logging", "trio", "os", "subprocess"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_protocol_imports_only_pure_stdlib_modules() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 6
    for path in modules:
        imported = _imports(path) - {"__future__"}
        outside = {n for n in imported if n not in sys.stdlib_module_names}
        assert not outside, f"{path.name} imports {outside}"
        assert not imported & FORBIDDEN, f"{path.name} imports {imported & FORBIDDEN}"


def test_every_event_class_is_exported_by_the_package() -> None:
    """Callers import events from the package; ``events`` itself must keep working too."""
    from erofs_nbdd.protocol import events

    public = {
        name
        for name, value in vars(events).items()
        if not name.startswith("_")
        and (
            isinstance(value, types.UnionType)  # OptionEvent, HandshakeReply, ReplyEvent
            or (isinstance(value, type) and value.__module__ == events.__name__)
        )
    }
    assert {"InfoOption", "Request", "ReplyEvent", "NeedData", "NoneChunk"} <= public
    missing = public - set(erofs_nbdd.protocol.__all__)
    assert not missing, f"not in erofs_nbdd.protocol.__all__: {sorted(missing)}"
    for name in public:
        assert getattr(erofs_nbdd.protocol, name) is getattr(events, name)
