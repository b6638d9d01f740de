"""Issue 29 item 9: messages that said the wrong thing, and paths found in the wrong place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import DATA, ROOT, Isolated, streamd


def test_source_none_without_a_network_listener_says_what_to_configure(iso):
    r = streamd("run", *iso.sets('metrics.listen=""'), "--source", "none")
    assert r.returncode == 65, r.stderr
    assert "network.listen" in r.stderr and "--source" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_outside_the_checkout_without_a_config_finds_the_installed_models(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    iso = Isolated(tmp_path)
    r = subprocess.run([sys.executable, "-m", "streamd", "run", *iso.sets(
        'metrics.listen=""', f'control.endpoint="ipc://{tmp_path}/control.sock"'),
        "--source", f"file:{DATA / 'word.flac'}", "--pace", "fast"], cwd=elsewhere, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "cannot read model card" not in r.stderr


def test_file_sources_of_a_config_file_are_read_from_its_folder(tmp_path):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    shutil.copy(DATA / "word.flac", conf_dir / "hello.flac")
    conf = conf_dir / "streamd.toml"
    conf.write_text('[source]\nspec = "file:hello.flac"\npace = "fast"\n'
                    f'[control]\nendpoint = "ipc://{tmp_path}/control.sock"\n[metrics]\nlisten = ""\n')
    iso = Isolated(tmp_path)
    r = streamd("run", "--config", str(conf), *iso.sets())  # run from the checkout, not conf/
    assert r.returncode == 0, r.stderr
    assert not (ROOT / "hello.flac").exists()
