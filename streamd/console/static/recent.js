// Recent voices: the last utterances with their decisions; enroll a person from some of them
// ("this was NAME"), from the next seconds of speech, or promote a recurring unknown voice.
"use strict";

const ticked = new Set(); // "stream#utterance"
let audioKept = false; // the daemon keeps the recent utterances' audio (identity.keep_recent_audio)
let refreshQueued = false;
let clustersQueued = false;

function utteranceRow(u) {
  const $ = Streamd.el;
  const key = `${u.stream}#${u.utterance}`;
  const box = $("input", { type: "checkbox", "aria-label": `utterance ${u.utterance}` });
  box.checked = ticked.has(key);
  box.addEventListener("change", () => (box.checked ? ticked.add(key) : ticked.delete(key)));
  const who = u.speaker === null ? "…" : u.speaker;
  const digit = u.digit === null || u.digit === undefined ? (u.speaker === null ? "…" : "–") : String(u.digit);
  return $("tr", { "data-stream": u.stream, "data-utterance": u.utterance, "data-speaker": u.speaker },
    $("td", {}, box), $("td", {}, Streamd.clock(u.time)), $("td", {}, u.stream),
    $("td", { class: "num" }, String(u.utterance)), $("td", { class: "num" }, `${(u.t_end - u.t_start).toFixed(2)} s`),
    $("td", { class: u.speaker === "unknown" ? "unknown" : "named" }, who),
    $("td", { class: "num" }, u.score === null ? "" : u.score.toFixed(2)),
    $("td", {}, u.cluster || ""), $("td", {}, digit + (u.degraded ? " (degraded)" : "")),
    $("td", {}, audioKept && u.speaker !== null ? playButton(u) : ""));
}

async function whyNotPlayed(url, err) {
  const reply = await fetch(url, { headers: { Accept: "application/json" } });
  if ((reply.headers.get("content-type") || "").startsWith("audio/")) return `this browser could not play it: ${err.message}`;
  try { return (await reply.json()).error || `HTTP ${reply.status}`; } catch (e) { return `HTTP ${reply.status}`; }
}

// Plays an utterance's audio from the daemon's memory (GET /api/recent/audio); when the audio
// element cannot, the route's JSON says why (e.g. the utterance was pushed out meanwhile).
function playButton(u) {
  const url = `/api/recent/audio?stream=${encodeURIComponent(u.stream)}&utterance=${u.utterance}`;
  return Streamd.el("button", {
    class: "play", type: "button", "aria-label": `play utterance ${u.utterance}`,
    onclick: async () => {
      const player = document.getElementById("player");
      player.src = url;
      try {
        await player.play();
        Streamd.say("play-message", `playing utterance ${u.utterance} of ${u.stream}`);
      } catch (err) {
        Streamd.say("play-message", await whyNotPlayed(url, err), true);
      }
    },
  }, "▶");
}

async function loadRecent() {
  refreshQueued = false;
  const r = await Streamd.get("/api/recent");
  audioKept = r.audio_kept;
  document.getElementById("audio-note").textContent = r.audio_note;
  document.querySelector("#recent tbody").replaceChildren(...r.utterances.map(utteranceRow));
  const streams = [...new Set(r.utterances.map((u) => u.stream))].sort();
  const select = document.getElementById("next-stream");
  const chosen = select.value;
  select.replaceChildren(Streamd.el("option", { value: "" }, "the only stream"),
    ...streams.map((s) => Streamd.el("option", { value: s }, s)));
  select.value = streams.includes(chosen) ? chosen : "";
}

const clusterRows = new Map(); // cluster label: its row, kept so a name being typed survives a refresh

function clusterRow(c) {
  const $ = Streamd.el;
  const name = $("input", { type: "text", placeholder: "name", "aria-label": `name for ${c.cluster}`, required: "" });
  const form = $("form", { class: "inline" }, name, $("button", { class: "primary", type: "submit" }, "Promote"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await Streamd.post("/api/promote", { cluster: c.cluster, name: name.value });
      Streamd.say("clusters-message", `${c.cluster} is now ${r.name}: ${r.utterances} utterances, ${r.seconds.toFixed(1)} s`);
    } catch (err) { Streamd.say("clusters-message", err.message, true); }
    loadClusters();
  });
  return $("tr", { "data-cluster": c.cluster }, $("td", { class: "unknown" }, c.cluster),
    $("td", { class: "num" }), $("td", { class: "num" }), $("td", { class: "num" }), $("td", {}), $("td", {}, form));
}

function fillCluster(row, c) {
  const cells = row.cells;
  cells[1].textContent = String(c.heard);
  cells[2].textContent = `${c.seconds.toFixed(1)} s`;
  cells[3].textContent = `${c.kept_seconds.toFixed(1)} s`;
  cells[4].textContent = Streamd.ago(c.updated);
}

async function loadClusters() {
  clustersQueued = false;
  try {
    const r = await Streamd.get("/api/clusters");
    const body = document.querySelector("#clusters tbody");
    const now = new Set(r.clusters.map((c) => c.cluster));
    for (const [label, row] of clusterRows) {
      if (!now.has(label)) { row.remove(); clusterRows.delete(label); }
    }
    for (const c of r.clusters) {
      if (!clusterRows.has(c.cluster)) clusterRows.set(c.cluster, clusterRow(c));
      fillCluster(clusterRows.get(c.cluster), c);
      body.append(clusterRows.get(c.cluster)); // in the daemon's order
    }
  } catch (err) { Streamd.say("clusters-message", err.message, true); }
}

async function thisWas(e) {
  e.preventDefault();
  const picked = [...ticked].map((k) => k.split("#"));
  const streams = new Set(picked.map(([s]) => s));
  if (!picked.length) return Streamd.say("this-was-message", "tick the utterances of that person first", true);
  if (streams.size > 1) return Streamd.say("this-was-message", "tick utterances of one stream", true);
  const name = document.getElementById("this-was-name").value;
  try {
    const r = await Streamd.post("/api/enroll_recent",
      { name, stream: [...streams][0], utterances: picked.map(([, u]) => Number(u)) });
    Streamd.say("this-was-message", `enrolled ${r.name}: ${r.utterances} utterances, ${r.seconds.toFixed(1)} s of speech`);
    ticked.clear();
  } catch (err) { Streamd.say("this-was-message", err.message, true); }
  loadRecent();
}

async function enrollNext(e) {
  e.preventDefault();
  const name = document.getElementById("next-name").value;
  const seconds = Number(document.getElementById("next-seconds").value);
  const stream = document.getElementById("next-stream").value;
  const button = document.getElementById("next-button");
  button.disabled = true;
  Streamd.say("next-message", `listening: ${name} should speak now, for ${seconds} s of speech…`);
  try {
    const r = await Streamd.post("/api/enroll_next", stream ? { name, seconds, stream } : { name, seconds });
    Streamd.say("next-message", `enrolled ${r.name}: ${r.utterances} utterances, ${r.seconds.toFixed(1)} s of speech`);
  } catch (err) { Streamd.say("next-message", err.message, true); }
  button.disabled = false;
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("this-was").addEventListener("submit", thisWas);
  document.getElementById("enroll-next").addEventListener("submit", enrollNext);
  loadRecent();
  loadClusters();
  const opened = Date.now() / 1000;
  Streamd.events((ev) => {
    if (ev.time < opened) return; // shown by the first load already
    if (["speaker", "digit", "vad.end"].includes(ev.type) && !refreshQueued) {
      refreshQueued = true;
      setTimeout(loadRecent, 300); // one refresh for a burst of events
    }
    if ((ev.type === "gallery" || (ev.type === "speaker" && ev.cluster)) && !clustersQueued) {
      clustersQueued = true;
      setTimeout(loadClusters, 300);
    }
  }, Streamd.connection);
});
