// Live: every decision as the daemon publishes it, stream health and latency from the
// daemon's stats and metrics.
"use strict";

const MAX_ROWS = 200;
const opened = Date.now() / 1000;
// Lag from publication (the event's "time") to being shown here, for events published after
// the page opened: read by the tests and the benchmark (scripts/console_bench.py).
const stats = { shown: 0, lags: [], skipped: 0 };
window.streamdConsole = stats;

function decision(ev) {
  const $ = Streamd.el;
  if (ev.type === "speaker" || ev.type === "speaker.partial") {
    const who = ev.speaker === "unknown" ? (ev.cluster || "unknown") : ev.speaker;
    return [$("span", { class: ev.speaker === "unknown" ? "unknown" : "named" }, who), ev.score.toFixed(2)];
  }
  if (ev.type === "digit") {
    const said = ev.digit === null ? "– (not a digit)" : String(ev.digit);
    const by = ev.vocabulary && ev.vocabulary !== "builtin" ? ` (${ev.vocabulary})` : "";
    return [$("span", { class: "named" }, said + by), ev.confidence.toFixed(2)];
  }
  if (ev.type === "digits") { // a digit string (the PIN issue's event)
    const said = ev.digits === null ? `– (${ev.reason || "no digits"})` : ev.digits;
    return [$("span", { class: "named" }, said), ev.confidence.toFixed(2)];
  }
  if (ev.type === "verification") {
    const heard = ev.digits_heard === null || ev.digits_heard === undefined ? "–" : ev.digits_heard;
    return [$("span", { class: ev.result === "pass" ? "good" : "bad" }, `${ev.result}: ${ev.speaker}, heard ${heard}`),
      ev.voice_score === null || ev.voice_score === undefined ? "" : ev.voice_score.toFixed(2)];
  }
  if (ev.type === "status") return [`${ev.state}${ev.reason ? ` (${ev.reason})` : ""}`, ""];
  if (ev.type === "gallery") return [`${ev.action} ${ev.name || "(removed)"} by ${ev.who}`, ""];
  if (ev.type === "vad.end") return [`speech ended (${ev.reason})`, ""];
  if (ev.type === "vad.start") return ["speech started", ""];
  return [ev.type, ""];
}

function label(ev) {
  if (ev.type === "speaker.partial") return "speaker so far";
  return ev.degraded ? `${ev.type} (degraded)` : ev.type;
}

function show(ev) {
  const now = Date.now() / 1000;
  if (ev.type === "console.skipped") {
    stats.skipped += ev.skipped;
    return;
  }
  document.getElementById("received").textContent = String(++stats.shown);
  if (ev.type.startsWith("vad.") && !document.getElementById("show-vad").checked) return;
  const replayed = ev.time < opened;
  if (!replayed) {
    stats.lags.push(now - ev.time);
    if (stats.lags.length > 20000) stats.lags.splice(0, 10000);
  }
  const [what, score] = decision(ev);
  const row = Streamd.el("tr", {
    class: replayed ? "replayed" : ev.type === "speaker.partial" ? "partial" : "",
    "data-type": ev.type, "data-stream": ev.stream, "data-utterance": ev.utterance,
    "data-time": ev.time, "data-shown": now, "data-speaker": ev.speaker,
  },
    Streamd.el("td", {}, Streamd.clock(ev.time)), Streamd.el("td", {}, ev.stream),
    Streamd.el("td", { class: "num" }, ev.utterance === undefined ? "" : String(ev.utterance)),
    Streamd.el("td", {}, label(ev)), Streamd.el("td", {}, what), Streamd.el("td", { class: "num" }, score),
    Streamd.el("td", { class: "num" }, ev.latency_s === undefined ? "" : Streamd.ms(ev.latency_s)));
  const body = document.querySelector("#events tbody");
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
}

function streamRow(name, s, stats_, m) {
  const $ = Streamd.el;
  const up = m && m.up !== null && m.up !== undefined ? (m.up ? "up" : "down") : (s ? s.state : "–");
  return $("tr", { "data-stream": name },
    $("td", {}, name), $("td", { class: up === "up" ? "good" : "bad" }, up + (s && s.reason ? ` (${s.reason})` : "")),
    $("td", {}, m ? Streamd.ago(m.last_frame) : "–"),
    $("td", { class: "num" }, m ? String(m.overruns) : "–"),
    $("td", { class: "num" }, stats_ ? String(stats_.utterances) : "–"),
    $("td", { class: "num" }, m ? Streamd.ms(m.p50) : "–"), $("td", { class: "num" }, m ? Streamd.ms(m.p99) : "–"),
    $("td", {}, s ? Streamd.ago(s.last_event) : "–"));
}

async function health() {
  let h;
  try { h = await Streamd.get("/api/health"); } catch (e) { return; }
  const daemon = h.daemon.ok ? h.daemon : null;
  document.getElementById("daemon-note").textContent = daemon
    ? `daemon up ${daemon.uptime_s.toFixed(0)} s · ${daemon.speakers} speakers enrolled · ${daemon.events_published} events published, ${daemon.events_dropped} dropped by the daemon`
    : `daemon: ${h.daemon.error}`;
  const m = h.metrics && !h.metrics.error ? h.metrics : null;
  document.getElementById("p50").textContent = m ? Streamd.ms(m.p50) : "–";
  document.getElementById("p99").textContent = m ? Streamd.ms(m.p99) : "–";
  document.getElementById("decisions").textContent = m ? String(m.decisions) : "–";
  document.getElementById("lost").textContent = String(h.events.lost);
  document.getElementById("latency-note").textContent = h.metrics_note ? h.metrics_note
    : !m ? `metrics: ${h.metrics.error}`
    : m.window_s > 0 ? `over the last ${m.window_s.toFixed(0)} s, from ${m.url}` : `since the daemon started, from ${m.url}`;
  const names = new Set([...Object.keys(h.streams), ...Object.keys(daemon ? daemon.streams : {}),
    ...Object.keys(m ? m.streams : {})]);
  const body = document.querySelector("#streams tbody");
  body.replaceChildren(...[...names].sort().map((n) =>
    streamRow(n, h.streams[n], daemon ? daemon.streams[n] : null, m ? m.streams[n] : null)));
}

document.addEventListener("DOMContentLoaded", () => {
  Streamd.events(show, Streamd.connection);
  health();
  setInterval(health, 2000);
});
