"""Bad command-line arguments: each is one line naming the argument, never a traceback, and
never a command that runs on with a meaningless value (a negative timeout once meant "wait
forever"). The CLI's ``main`` is called in this process, with its argv (argparse's usage
errors come as SystemExit); only what starts the daemon runs as a process of its own."""

import signal

import pytest

from conftest import DATA, ROOT, streamd
from streamd import cli


@pytest.fixture
def in_process(capsys, monkeypatch):
    """Run ``streamd ARGS`` in this process: (exit status, stderr). An exception escaping
    ``main`` (a traceback in a real run) fails the test as it is."""
    monkeypatch.chdir(ROOT)  # as the CLI runs from a checkout: config.toml, relative paths
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def run(args: list[str]) -> tuple[int, str]:
        try:
            rc = cli.main(list(args))
        except SystemExit as exc:  # argparse
            rc = exc.code
        finally:
            for s, h in handlers.items():  # `send` takes SIGTERM over, as a CLI may
                signal.signal(s, h)
        return rc, capsys.readouterr().err

    return run


@pytest.mark.parametrize("args, rc, why", [
    (["listen", "--count", "-1"], 2, "--count: '-1' is not a number of events from 0"),
    (["listen", "--timeout", "-5", "--count", "1"], 2, "--timeout: '-5' is not a number of seconds from 0"),
    (["listen", "--timeout", "nan"], 2, "--timeout: 'nan' is not a number of seconds"),
    (["listen", "--endpoint", "garbage", "--timeout", "1"], 2, "listen --endpoint garbage: cannot connect"),
    (["bench", "--seconds", "0"], 2, "--seconds: '0' is not a number of seconds from 0.1 to 86400"),
    (["send", "--to", "tcp://127.0.0.1:1", "--wait", "-1"], 2, "--wait: '-1' is not a number of seconds"),
    (["send", "--to", "127.0.0.1:5700"], 2, "'127.0.0.1:5700' is not a tcp://HOST:PORT or ipc://PATH endpoint"),
    (["send", "--to", "tcp://127.0.0.1:notaport", "--source", f"file:{DATA / 'word.flac'}"], 69,
     "tcp://127.0.0.1:notaport: cannot connect: Invalid argument"),
    (["run", "--wait-subscriber", "-1"], 2, "--wait-subscriber: '-1' is not a number of seconds from 0 to 3600"),
    (["enroll", "bob", str(DATA)], 65, "tests/data: not an audio file (a directory)"),
    (["enroll", "bob", "/dev/null"], 65, "/dev/null: not a regular file"),
    (["eval", "digits", "/nonexistent"], 65, "/nonexistent: no fsdd/manifest.csv here"),  # DATA, as issue 4 writes it
    (["eval", "speakers", "/a", "--data", "/b"], 2, "two corpora folders given (/a and --data /b)"),
    (["train", "fusion", "--data", "/nonexistent"], 2, "streamd train: /nonexistent: no fsdd/manifest.csv here"),
    (["eval", "--phrase-clips", "x"], 2, "--phrase-clips: 'x' is not a number of clips from 1 to 50"),
])
def test_a_bad_argument_is_one_line_that_names_it(in_process, args, rc, why):
    code, err = in_process(args)
    assert code == rc and why in err, err
    assert len(err.strip().splitlines()) == 1 or err.startswith("usage:")  # argparse: usage, then the line


def test_a_daemon_that_cannot_write_its_events_file_says_so_in_one_line(iso, tmp_path):
    """`run` starts the daemon (models, signal handlers, threads): a process of its own, with
    its own state, ports and control socket (another daemon running must not answer first)."""
    r = streamd("run", *iso.sets(f'control.endpoint="ipc://{tmp_path}/control.sock"'),
                "--events-jsonl", "/nonexistent/events.jsonl", "--source", f"file:{DATA / 'word.flac'}", timeout=30)
    assert r.returncode == 69, r.stderr
    assert "events jsonl /nonexistent/events.jsonl: cannot write: No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
