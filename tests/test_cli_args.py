"""Bad command-line arguments: each is one line naming the argument, never a traceback, and
never a command that runs on with a meaningless value (a negative timeout once meant "wait
forever")."""

import pytest

from conftest import DATA, streamd


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
    (["run", "--events-jsonl", "/nonexistent/events.jsonl", "--source", f"file:{DATA / 'word.flac'}"], 69,
     "events jsonl /nonexistent/events.jsonl: cannot write: No such file or directory"),
    (["eval", "--phrase-clips", "x"], 2, "--phrase-clips: 'x' is not a number of clips from 1 to 50"),
])
def test_a_bad_argument_is_one_line_that_names_it(args, rc, why):
    r = streamd(*args, timeout=30)
    assert r.returncode == rc and why in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 or r.stderr.startswith("usage:")  # argparse: usage, then the line
