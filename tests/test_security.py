"""Security: CurveZMQ remote control (real sockets, real keys), nothing beyond loopback
without it, `streamd keys generate`, and no code-executing loader in the package."""

import ast
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from streamd import config, keys

from streamd.service import control
from streamd.config import ConfigError
from conftest import ROOT, free_port, start_streamd, stop, streamd
from helpers import client_curve, server_sets


class Served:
    """A ControlServer answering in a thread of its own, as the daemon's loop does."""

    def __init__(self, cfg):
        self.server = control.ControlServer("tcp://127.0.0.1:0", curve=control.server_curve(cfg))
        self.endpoint = self.server.endpoint
        self.seen: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop)
        self._thread.start()

    def _handle(self, request, pending):
        self.seen.append(request)
        return {"ok": True, "echo": request["cmd"]}

    def _loop(self):
        while not self._stop.is_set():
            self.server.poll(self._handle, 20)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def test_only_authorised_clients_get_replies(curve):
    before = threading.active_count()
    served = Served(config.load(None, server_sets(curve)))
    try:
        good = client_curve(curve)
        assert control.request(served.endpoint, {"cmd": "stats"}, 5, curve=good) == {"ok": True, "echo": "stats"}
        wrong_key = client_curve(curve, "intruder")  # knows the daemon's public key, is not authorised
        assert control.request(served.endpoint, {"cmd": "wrong_key"}, 0.7, curve=wrong_key) is None
        plain = None  # no CurveZMQ at all
        assert control.request(served.endpoint, {"cmd": "plain"}, 0.7, curve=plain) is None
        fake_server = client_curve(curve, server="intruder/intruder.key")  # talks to the wrong daemon key
        assert control.request(served.endpoint, {"cmd": "fake_server"}, 0.7, curve=fake_server) is None
        # The server goes on answering the good client, and never saw the others' requests.
        assert control.request(served.endpoint, {"cmd": "again"}, 5, curve=good)["echo"] == "again"
        assert [r["cmd"] for r in served.seen] == ["stats", "again"]
    finally:
        served.close()
    assert threading.active_count() == before  # the ZAP authenticator thread is gone


def asked_in_a_thread(endpoint: str, times: int, timeout_s: float, curve=None) -> tuple[list, list[float]]:
    """control.request made ``times`` times from a thread that must finish: a request that
    waits past its timeout fails the test instead of hanging it. Replies and seconds taken."""
    replies, took = [], []

    def ask():
        for _ in range(times):
            t0 = time.monotonic()
            replies.append(control.request(endpoint, {"cmd": "x"}, timeout_s, curve=curve))
            took.append(time.monotonic() - t0)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(30)
    assert not asker.is_alive(), "a request waited past its timeout"
    return replies, took


def test_a_refused_client_hears_nothing_within_its_timeout_every_time(curve):
    # The refusal closes the connection; a request must not wait past its timeout for one
    # (it once hung in send when the refusal came first).
    served = Served(config.load(None, server_sets(curve)))
    try:
        replies, took = asked_in_a_thread(served.endpoint, 10, 0.3, client_curve(curve, "intruder"))
        assert replies == [None] * 10 and max(took) < 1.5, took
        assert control.request(served.endpoint, {"cmd": "after"}, 5, curve=client_curve(curve))["echo"] == "after"
    finally:
        served.close()


def test_a_request_to_nothing_returns_none_within_its_timeout():
    replies, took = asked_in_a_thread(f"tcp://127.0.0.1:{free_port()}", 1, 0.3)
    assert replies == [None] and took[0] < 1.5, took


def test_control_server_refuses_to_listen_beyond_loopback_without_curve():
    with pytest.raises(ConfigError, match="control.endpoint: tcp://0.0.0.0:0 is reachable beyond"):
        control.ControlServer("tcp://0.0.0.0:0")


@pytest.mark.slow  # about 12 s on a 2-core machine
def test_daemon_with_curve_serves_the_authorised_cli(curve, iso, notify, tmp_path):
    ctl = f"tcp://127.0.0.1:{free_port()}"
    sets = iso.sets(f'control.endpoint="{ctl}"', *server_sets(curve))
    proc = start_streamd("run", *sets, "--source", "stdin", env={"NOTIFY_SOCKET": notify.path},
                         stdin=subprocess.PIPE)
    try:
        assert notify.wait_for("READY=1", 60), proc.stderr.read() if proc.poll() is not None else ""
        assert control.request(ctl, {"cmd": "stats"}, 5, curve=client_curve(curve))["ok"] is True
        assert control.request(ctl, {"cmd": "stats"}, 0.7) is None
        assert control.request(ctl, {"cmd": "stats"}, 0.7, curve=client_curve(curve, "intruder")) is None
        listed = streamd("speakers", *iso.sets(f'control.endpoint="{ctl}"'), "list",
                         "--client-key", f"{curve}/client/client.key_secret",
                         "--server-key", f"{curve}/server/server.key")
        assert listed.returncode == 0 and listed.stdout == "", listed.stderr
        remote = f"tcp://10.255.255.1:{free_port()}"  # a remote daemon that refuses or is not there
        far = streamd("speakers", "--set", f'control.endpoint="{remote}"', "list",
                      "--set", f'control.curve_client_key="{curve}/intruder/intruder.key_secret"',
                      "--set", f'control.curve_server_key="{curve}/server/server.key"')
        assert far.returncode == 69 and "no reply from" in far.stderr  # not the local gallery instead
        assert control.request(ctl, {"cmd": "stats"}, 5, curve=client_curve(curve))["ok"] is True
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        stop(proc)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://10.1.2.3:5557",
                                      "tcp://eth0:5557", "tcp://[::]:5557", "tcp://example.org:5557"])
def test_config_refuses_control_beyond_loopback_without_curve(endpoint):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f'control.endpoint="{endpoint}"'])
    assert str(err.value).startswith("control.endpoint: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5557", "tcp://127.0.0.9:5557", "tcp://[::1]:5557",
                                      "tcp://localhost:5557", "ipc:///tmp/x/control.sock", ""])
def test_config_takes_local_control_endpoints(endpoint):
    assert config.load(None, [f'control.endpoint="{endpoint}"']).control.endpoint == endpoint


def test_config_with_curve_may_listen_anywhere(curve):
    cfg = config.load(None, ['control.endpoint="tcp://*:5557"', *server_sets(curve)])
    assert control.server_curve(cfg).clients == curve / "clients"


def test_cli_refuses_a_public_control_socket_with_one_line():
    r = streamd("run", "--source", "stdin", "--set", 'control.endpoint="tcp://0.0.0.0:5557"')
    assert r.returncode == 78 and "control.endpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5556", "tcp://*:5556", "epgm://eth0;239.1.1.1:5556"])
def test_events_stay_on_this_machine(endpoint, curve):
    for extra in ([], server_sets(curve)):  # CurveZMQ on control does not cover the events
        with pytest.raises(ConfigError, match="^events.endpoint: "):
            config.load(None, [f'events.endpoint="{endpoint}"', *extra])


def test_bad_key_settings_are_one_line_errors_naming_the_file(curve):
    d = curve
    loose = d / "server" / "loose.key_secret"
    shutil.copy(d / "server" / "server.key_secret", loose)
    os.chmod(loose, 0o644)
    cases = [
        ([f'control.curve_secret_key="{d}/nope.key_secret"', f'control.curve_clients="{d}/clients"'],
         "control.curve_secret_key", "nope.key_secret"),
        ([f'control.curve_secret_key="{d}/server/server.key"', f'control.curve_clients="{d}/clients"'],
         "control.curve_secret_key", "server.key"),  # the public half
        ([f'control.curve_secret_key="{loose}"', f'control.curve_clients="{d}/clients"'],
         "control.curve_secret_key", "chmod 600"),
        ([f'control.curve_secret_key="{d}/server/server.key_secret"', f'control.curve_clients="{d}/none"'],
         "control.curve_clients", "none"),
        ([f'control.curve_secret_key="{d}/server/server.key_secret"', f'control.curve_clients="{d}/server/x"'],
         "control.curve_clients", "server/x"),
        ([f'control.curve_secret_key="{d}/server/server.key_secret"'], "control.curve_clients", "curve_secret_key"),
        ([f'control.curve_client_key="{d}/client/client.key_secret"'], "control.curve_server_key", "curve_client_key"),
        ([f'control.curve_client_key="{d}/client/client.key_secret"', f'control.curve_server_key="{d}/gone.key"'],
         "control.curve_server_key", "gone.key"),
    ]
    empty = d / "server" / "x"
    empty.mkdir()
    for sets, key, text in cases:
        with pytest.raises(ConfigError) as err:
            config.load(None, sets)
        msg = str(err.value)
        assert msg.startswith(key + ":") and text in msg and "\n" not in msg, (sets, msg)


def test_keys_generate_writes_owner_only_files_and_never_overwrites(tmp_path):
    d = tmp_path / "k"
    # Works in a folder whose config.toml names the keys not made yet (it reads no config).
    (tmp_path / "config.toml").write_text(f'[control]\ncurve_secret_key = "{d}/daemon.key_secret"\n'
                                          f'curve_clients = "{d}"\n')
    r = subprocess.run([sys.executable, "-m", "streamd", "keys", "generate", "--dir", str(d), "--name", "daemon"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{d}/daemon.key" in r.stdout and f"{d}/daemon.key_secret" in r.stdout
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "daemon.key_secret").st_mode) == 0o600
    pair = keys.load_secret(d / "daemon.key_secret")
    assert keys.load_public(d / "daemon.key") == pair.public
    first = (d / "daemon.key_secret").read_bytes()
    again = streamd("keys", "generate", "--dir", str(d), "--name", "daemon")
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert (d / "daemon.key_secret").read_bytes() == first
    forced = streamd("keys", "generate", "--dir", str(d), "--name", "daemon", "--force")
    assert forced.returncode == 0 and (d / "daemon.key_secret").read_bytes() != first
    assert stat.S_IMODE(os.stat(d / "daemon.key_secret").st_mode) == 0o600


# Modules that run code from the data they load, and calls that do unless told not to.
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "__import__"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def loader_problems(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            problems.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            short = name.rsplit(".", 1)[-1]
            where = f"{name}() on line {node.lineno}"
            if name in FORBIDDEN_CALLS:
                problems.append(where)
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
                problems.append(where + " without allow_pickle=False")
            elif name == "torch.load" and _kw(node, "weights_only") is not True:
                problems.append(where + " without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load") or short in (
                    "read_pickle", "from_pickle") or name == "torch.jit.load":
                problems.append(where)
    return problems


def test_the_audit_catches_what_it_is_for():
    assert loader_problems("import pickle") and loader_problems("from joblib import load")
    assert loader_problems("np.load('x.npy')") and loader_problems("np.load('x', allow_pickle=True)")
    assert not loader_problems("np.load('x', allow_pickle=False)")
    assert loader_problems("torch.load('w.pt')") and not loader_problems("torch.load(p, weights_only=True)")
    assert loader_problems("eval(s)") and loader_problems("yaml.load(f)")


def test_no_code_executing_loader_in_the_package():
    found = {}
    for path in sorted((ROOT / "streamd").rglob("*.py")):
        problems = loader_problems(path.read_text(encoding="utf-8"))
        if problems:
            found[str(path.relative_to(ROOT))] = problems
    assert found == {}
    torch_users = [p.relative_to(ROOT).as_posix() for p in (ROOT / "streamd").rglob("*.py")
                   if "import torch" in p.read_text(encoding="utf-8")]
    assert all(p.startswith("streamd/train/") for p in torch_users), torch_users
