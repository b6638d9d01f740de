"""The package is grouped by pipeline stage and imports flow one way: a stage imports only the
stages below it (issue 30). Every import counts, also those inside functions."""

import ast

from conftest import ROOT

# Lowest first. config and keys are the settings every stage reads: they sit above the signal
# stage (config holds its parameter types) and below the models. The web console is a client of
# the service's sockets, above it.
LAYERS = ("audio", "signal", "settings", "models", "identity", "service", "console", "offline", "train", "cli")
SETTINGS = {"config", "keys", "__init__"}
CLI = {"cli", "cli_digits", "cli_pin", "__main__"}


def stage_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "streamd":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in SETTINGS:
        return "settings"
    if parts[1] in CLI:
        return "cli"
    return parts[1]


def imports_of(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("streamd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("streamd"):
            out.update(f"{node.module}.{a.name}" if node.module == "streamd" else node.module for a in node.names)
    return out


def module_of(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward(module: str, targets: set[str]) -> list[str]:
    """The imports of ``module`` that reach a stage above its own."""
    mine = LAYERS.index(stage_of(module))
    return sorted(f"{module} -> {t}" for t in targets
                  if not t.startswith("streamd.__version__") and LAYERS.index(stage_of(t)) > mine)


def upward_imports() -> list[str]:
    return [bad for path in sorted((ROOT / "streamd").rglob("*.py"))
            for bad in upward(module_of(path), imports_of(path))]


def test_every_module_belongs_to_a_stage():
    stages = {stage_of(module_of(p)) for p in (ROOT / "streamd").rglob("*.py")}
    assert stages <= set(LAYERS)
    top = sorted(p.stem for p in (ROOT / "streamd").glob("*.py"))
    assert set(top) <= SETTINGS | CLI | {"__init__"}, top


def test_imports_flow_one_way_down_the_stages():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import():
    """The contract can fail: a signal-stage module importing the service, or models importing
    identity, is caught; importing downwards is not."""
    assert upward("streamd.signal.vad", {"streamd.service.daemon"}) == ["streamd.signal.vad -> streamd.service.daemon"]
    assert upward("streamd.models.digits", {"streamd.identity.gallery", "streamd.signal.features"}) == \
        ["streamd.models.digits -> streamd.identity.gallery"]
    assert upward("streamd.service.pipeline", {"streamd.config", "streamd.audio.frames"}) == []


def test_identity_and_pipeline_do_not_import_the_sqlite_module():
    for name in ("identity/scoring.py", "service/pipeline.py", "service/segmentation.py", "service/pending.py",
                 "service/decisions.py"):
        assert not any(t.startswith("streamd.identity.gallery") for t in imports_of(ROOT / "streamd" / name)), name
