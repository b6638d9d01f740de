"""The Grafana dashboard (dashboards/streamd.json): its structure, and every PromQL expression in
it run by a real Prometheus server against a real daemon that has just processed real audio."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from streamd.audio.sources import read_audio
from conftest import DATA, ROOT, Isolated, free_port, start_streamd, stop

DASHBOARD = ROOT / "dashboards" / "streamd.json"
DS_UID = "${datasource}"
# What Grafana would put in for the template variables. Rate windows are wider than the whole
# run, so each rate sees every scrape the test made (rate() needs two samples in its window).
SUBSTITUTIONS = {
    "$__rate_interval": "30s", "${__rate_interval}": "30s", "$__interval": "5s", "${__interval}": "5s",
    "$__range": "30s", "${__range}": "30s", "$stream": ".*", "${stream}": ".*",
    "$node": ".*", "${node}": ".*",
}
UTTERANCES = 10  # in tests/data/demo.flac


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query in the dashboard."""
    return [(p["title"], t["refId"], t["expr"]) for p in all_panels(dash) if p["type"] != "row"
            for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for var in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(var, SUBSTITUTIONS[var])
    assert "$" not in expr, f"template variable left in {expr!r}: add it to SUBSTITUTIONS"
    return expr


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bstreamd_[a-zA-Z0-9_]+", expr))


def variable_queries(dash: dict) -> list[tuple[str, str]]:
    """(metric, label) of every label_values(metric, label) template variable."""
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*", q)
            assert m, f"variable {var['name']}: only label_values(metric, label) is checked here: {q}"
            out.append((m.group(1), m.group(2)))
    return out


def test_dashboard_structure():
    dash = load()
    assert dash["schemaVersion"] >= 36 and dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    stream = variables["stream"]
    assert stream["type"] == "query" and stream["datasource"]["uid"] == DS_UID
    assert stream["includeAll"] and stream["allValue"] == ".*"
    node = variables["node"]  # several daemons scraped by one Prometheus: one dashboard, a node picker
    assert node["type"] == "query" and node["includeAll"] and node["multi"] and node["allValue"] == ".*"

    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids not unique: {ids}"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DS_UID}, (p["title"], t["refId"])
            assert t["expr"].strip(), (p["title"], t["refId"])

    # The panels the operations guide promises.
    used = set().union(*(metric_names(e) for _, _, e in queries(dash)))
    assert {"streamd_latency_seconds_bucket", "streamd_stage_seconds_bucket", "streamd_events_total",
            "streamd_events_dropped_total", "streamd_capture_overruns_total", "streamd_speech_seconds_total",
            "streamd_audio_seconds_total", "streamd_model_info", "streamd_utterances_total", "streamd_stream_up",
            "streamd_source_failures_total", "streamd_network_frames_total", "streamd_network_lost_frames_total",
            "streamd_network_bad_messages_total", "streamd_network_delay_seconds_bucket", "streamd_shed_total",
            "streamd_backlog_seconds"} <= used
    exprs = " ".join(e for _, _, e in queries(dash))
    for title, ref, expr in queries(dash):
        for selector in re.findall(r"\bstreamd_\w+(\{[^}]*\})?", expr):
            assert 'instance=~"$node"' in selector, f"{title} {ref}: a series not filtered by node: {expr}"
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


# --- a daemon scraped by a real Prometheus --------------------------------------------------

def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_until(what: str, check, timeout: float, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}")
        time.sleep(0.2)


class Stack:
    def __init__(self, tmp, daemon, prom, prom_url, iso, prom_log, listen):
        self.tmp, self.daemon, self.prom, self.prom_url, self.iso, self.prom_log = tmp, daemon, prom, prom_url, iso, prom_log
        self.listen = listen  # the daemon's network.listen

    def api(self, path: str, **params) -> dict:
        body = json.loads(http_get(f"{self.prom_url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def explain(self) -> str:
        log = self.prom_log.read_text(errors="replace")[-3000:] if self.prom_log.exists() else ""
        return f"prometheus log (tail):\n{log}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (Debian package 'prometheus'; `make sysdeps` installs it)")
    tmp = tmp_path_factory.mktemp("dashboard")
    iso = Isolated(tmp)
    prom_port = free_port()
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: streamd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{iso.metrics_port}']\n")
    prom_log = tmp / "prometheus.log"
    with open(prom_log, "w") as log_fh:
        prom = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=log_fh, stderr=subprocess.STDOUT, cwd=tmp)
    # The audio comes on stdin, so the daemon stays up (and scraped) until the test is done.
    listen = f"tcp://127.0.0.1:{free_port()}"  # and a device's, from `streamd send`
    daemon = start_streamd("run", *iso.sets(f'control.endpoint="tcp://127.0.0.1:{free_port()}"',
                                            f'network.listen="{listen}"'),
                           "--source", "stdin", stdin=subprocess.PIPE)
    s = Stack(tmp, daemon, prom, f"http://127.0.0.1:{prom_port}", iso, prom_log, listen)
    try:
        yield s
    finally:
        if daemon.stdin and not daemon.stdin.closed:
            daemon.stdin.close()
        stop(daemon)
        stop(prom)


def daemon_metric(body: str, series: str) -> float | None:
    for line in body.splitlines():
        if line.rsplit(" ", 1)[0] == series:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def scraped(stack):
    """The stack after the daemon has processed tests/data/demo.flac and Prometheus has seen it."""
    def daemon_up():
        if stack.daemon.poll() is not None:
            pytest.fail(f"streamd exited with {stack.daemon.returncode}: {stack.daemon.stderr.read()}")
        return http_get(stack.iso.metrics_url)

    wait_until("the daemon's /metrics", daemon_up, 60)
    if stack.prom.poll() is not None:
        pytest.fail(f"prometheus exited with {stack.prom.returncode}\n{stack.explain()}")

    def target_up():
        targets = stack.api("targets")["activeTargets"]
        return targets and all(t["health"] == "up" for t in targets)

    wait_until("prometheus to scrape the daemon", target_up, 30, stack.explain)

    # Real audio at 4x real time: counters grow across several scrapes; meanwhile a device
    # sends its own recording at real time.
    device = start_streamd("send", "--source", f"file:{DATA / 'visitor21.flac'}", "--to", stack.listen,
                           "--stream", "remote")
    audio = read_audio(str(DATA / "demo.flac")).astype("<i2").tobytes()
    block = 16000 * 2 // 4  # a quarter second of s16le 16 kHz
    for i in range(0, len(audio), block):
        stack.daemon.stdin.buffer.write(audio[i:i + block])
        stack.daemon.stdin.buffer.flush()
        time.sleep(0.25 / 4)

    assert device.wait(60) == 0, device.stderr.read()
    digits = 'streamd_events_total{stream="default",type="digit"}'
    wait_until(f"the daemon to publish {UTTERANCES} digit events",
               lambda: daemon_metric(http_get(stack.iso.metrics_url), digits) == UTTERANCES, 30)
    wait_until("prometheus to scrape them",
               lambda: any(float(r["value"][1]) == UTTERANCES for r in stack.query(digits, time.time())),
               15, stack.explain)
    time.sleep(2.2)  # two more scrapes: every series has at least two samples
    return stack


@pytest.mark.server  # runs Prometheus
def test_every_dashboard_query_returns_data(scraped):
    at = time.time()
    failures = []
    for title, ref, expr in queries(load()):
        promql = substitute(expr)
        result = scraped.query(promql, at)
        values = [float(r["value"][1]) for r in result]
        if not values or not all(math.isfinite(v) for v in values):
            failures.append(f"{title} [{ref}]: {promql}\n    -> {result}")
    assert not failures, "queries without data:\n" + "\n".join(failures)

    # Spot checks that the numbers mean what the panels say.
    assert scraped.query('streamd_model_info{provider=~".+ExecutionProvider"}', at)
    ratio = scraped.query(substitute(next(e for t, _, e in queries(load()) if t == "Speech ratio")), at)
    assert all(0 < float(r["value"][1]) < 1 for r in ratio), ratio


@pytest.mark.server  # runs Prometheus
def test_template_variables_find_the_stream_and_node(scraped):
    expected = {"stream": ["default", "remote"], "instance": [scraped.iso.metrics_url.split("/")[2]]}
    for metric, label in variable_queries(load()):
        values = scraped.api(f"label/{label}/values", **{"match[]": metric})
        assert values == expected[label], (metric, label, values)


@pytest.mark.server  # runs Prometheus
def test_dashboard_uses_only_metrics_the_daemon_exposes(scraped):
    body = http_get(scraped.iso.metrics_url)
    exposed = {re.split(r"[{ ]", line, 1)[0] for line in body.splitlines() if line and not line.startswith("#")}
    dash = load()
    used = set().union(*(metric_names(e) for _, _, e in queries(dash)), (m for m, _ in variable_queries(dash)))
    assert used and used <= exposed, f"not exposed by streamd: {sorted(used - exposed)}"
