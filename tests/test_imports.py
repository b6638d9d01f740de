"""CI installs no torch (it is the [train] extra): every module that does not import torch
itself must import without it, so a torch-free module cannot pick it up through a helper."""

import ast
import subprocess
import sys

from conftest import ROOT


def imports_torch_at_top(path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "torch" or n.startswith("torch.") for n in names):
            return True
    return False


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_torch_free_modules_import_without_torch():
    paths = [p for p in sorted((ROOT / "streamd").rglob("*.py")) if p.name != "__main__.py"]
    torch_free = [module_name(p) for p in paths if not imports_torch_at_top(p)]
    assert "streamd.train.fusion" in torch_free and "streamd.train.nets" not in torch_free
    code = ("import importlib, sys\n"
            "class NoTorch:  # as if torch were not installed\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            f"for name in {torch_free!r}:\n"
            "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
