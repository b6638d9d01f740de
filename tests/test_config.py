import dataclasses
import tomllib

import pytest

from streamd import config
from streamd.config import ConfigError
from conftest import ROOT, streamd


def test_shipped_config_lists_every_key_with_its_default():
    tree = tomllib.loads((ROOT / "config.toml").read_text())
    defaults = config.Config()
    assert "streams" not in tree  # [[streams]] is shown commented out: the default is one stream
    for section in (f.name for f in dataclasses.fields(config.Config) if f.name not in ("base_dir", "streams")):
        obj = getattr(defaults, section)
        keys = {f.name for f in dataclasses.fields(obj)}
        assert set(tree[section]) == keys, section
        for key in keys:
            assert tree[section][key] == getattr(obj, key), f"{section}.{key}"


def test_every_key_is_documented_in_place():
    lines = (ROOT / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#") and "#" not in line:
            j = i - 1
            while "=" in lines[j] and not lines[j].startswith("#"):
                j -= 1  # keys may share one comment, as onset_ms and onset_ratio do
            assert lines[j].startswith("#") and i - j <= 2, line


def test_set_overrides_take_toml_values(tmp_path):
    cfg = config.load(ROOT / "config.toml", ['state.dir="var/state"', "vad.aggressiveness=3", "identity.threshold=0.7"])
    assert cfg.state_dir() == ROOT / "var" / "state"
    assert cfg.vad.aggressiveness == 3
    assert cfg.identity.threshold == 0.7


@pytest.mark.parametrize("override,names", [
    ("vad.bogus=1", "vad.bogus"),
    ("nosuch.key=1", "nosuch"),
    ("vad.aggressiveness=7", "vad.aggressiveness"),
    ('vad.aggressiveness="2"', "vad.aggressiveness"),
    ("vad.frame_ms=25", "vad.frame_ms"),
    ("events.endpoint=5", "events.endpoint"),
    ("state.dir=var/state", "state.dir"),
    ("vad.tail_ms=900", "vad.tail_ms"),
    ("features.numcep=0", "features.numcep"),
    ('digits.model="RNN"', "digits.model"),
    ('digits.model="rnn s1"', "digits.model"),
    ('digits.model=""', "digits.model"),
    ('identity.score="fused"', "identity.score"),
    ('state.gallery="mysql://db/streamd"', "state.gallery"),
    ('events.nats="nats://a:4222,http://b"', "events.nats"),
    ('events.nats_jetstream="a.b"', "events.nats_jetstream"),
    ("events.nats_buffer=0", "events.nats_buffer"),
    ('node.id="node a"', "node.id"),
])
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert str(err.value).startswith(names)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[metrics]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n")
    with pytest.raises(ConfigError, match=r"metrics\.listen_port: unknown key"):
        config.load(p)


@pytest.mark.parametrize("content,expect", [
    ("[vad]\naggressiveness = 9\n", "vad.aggressiveness"),
    ("[vad\n", "invalid TOML"),
    ("vad = 3\n", "vad: expected a table"),
])
def test_cli_exits_78_with_one_line(tmp_path, content, expect):
    p = tmp_path / "c.toml"
    p.write_text(content)
    for cmd in (["run", "--source", "stdin"], ["enroll", "x", "y.wav"], ["speakers", "list"]):
        r = streamd(*cmd, "--config", str(p))
        assert r.returncode == 78, r.stderr
        assert expect in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_cli_unreadable_config_is_78(tmp_path):
    r = streamd("run", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 78
    assert "missing.toml" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_set_is_78():
    r = streamd("run", "--set", "vad.aggressiveness=11")
    assert r.returncode == 78 and "vad.aggressiveness" in r.stderr


def test_streams_need_unique_ids_and_a_source(tmp_path):
    good = config.build({"streams": [{"id": "kitchen", "source": "mic:USB"}, {"id": "hall", "source": "net"}]})
    assert [s.id for s in good.streams] == ["kitchen", "hall"]
    for entries, error in (
        ([{"id": "a", "source": "stdin"}, {"id": "a", "source": "net"}], "used twice"),
        ([{"id": "bad id", "source": "stdin"}], "letters, digits"),
        ([{"id": "a"}], "streams[0].source: missing"),
        ([{"id": "a", "source": "stdin", "rate": 3}], "streams.rate: unknown key"),
        ({"id": "a"}, "array of tables"),
    ):
        with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
            config.build({"streams": entries})


def test_every_key_is_classified_for_reload():
    """Each key is applied at a SIGHUP reload or named as needing a restart: one table says
    which (config.ON_RELOAD), and it covers every key, with no entry left over."""
    keys = config.config_keys()
    assert "log.level" in keys and "digits.cascade" in keys and "streams" in keys
    for key in keys:
        assert config.on_reload(key) in (config.RELOAD, config.RESTART), key
    sections = {k.partition(".")[0] for k in keys}
    for entry in config.ON_RELOAD:
        assert entry in keys or entry in sections, f"ON_RELOAD names {entry}, which is no key"
    split = {k.partition(".")[0] for k in config.ON_RELOAD if "." in k}  # sections listed key by key
    for key in keys:
        if key.partition(".")[0] in split:
            assert key in config.ON_RELOAD, f"{key}: its section is listed key by key, it is not"


def test_a_reload_applies_reload_keys_and_names_the_others_until_a_restart():
    running = config.load(None)
    new = config.load(None, ['log.level="debug"', "identity.recent_utterances=5", "digits.min_confidence=0.7",
                             "vad.aggressiveness=1", "digits.cascade=false", 'events.endpoint="tcp://127.0.0.1:5999"'])
    after, restart = config.reload_plan(running, new)
    assert after.log.level == "debug" and after.identity.recent_utterances == 5 and after.digits.min_confidence == 0.7
    assert after.vad == running.vad and after.digits.cascade and after.events == running.events
    assert sorted(restart) == ["digits.cascade", "events.endpoint", "vad.aggressiveness"]
    again, restart_again = config.reload_plan(after, new)  # still waiting for a restart: said again
    assert again == after and sorted(restart_again) == sorted(restart)
    assert config.reload_plan(running, running) == (running, [])


def test_sighup_applies_log_level_and_names_the_keys_that_need_a_restart(iso, tmp_path):
    """On a real daemon: log.level takes effect at the reload; vad.aggressiveness and
    digits.cascade do not, and the warning names them."""
    import signal
    import subprocess
    import time
    import urllib.request

    from conftest import MODELS, start_streamd

    conf = tmp_path / "streamd.toml"
    conf.write_text(f'[models]\ndir = "{MODELS}"\n[log]\nlevel = "warning"\n')
    proc = start_streamd("run", "--config", str(conf), *iso.sets(), "--source", "stdin", stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # ready once /metrics answers
            try:
                urllib.request.urlopen(iso.metrics_url, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        conf.write_text(f'[models]\ndir = "{MODELS}"\n[log]\nlevel = "info"\n[vad]\naggressiveness = 1\n'
                        "[digits]\ncascade = false\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert proc.poll() is None
    finally:
        proc.stdin.close()
        code = proc.wait(30)
    err = proc.stderr.read()
    assert code == 0, err
    assert "INFO: ready" not in err  # log.level "warning" at start
    assert "reload: vad.aggressiveness, digits.cascade changed; restart streamd to apply them" in err, err
    assert "INFO: reloaded config and gallery (2 changed keys wait for a restart)" in err, err  # "info" now
