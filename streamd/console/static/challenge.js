// Challenge: a one-time code for a claimed speaker; the daemon's verification event says
// whether the next utterance on the stream said it in their voice.
"use strict";

let open = null; // {id, expires} of the challenge shown
let countdown = null;

async function fillChoices() {
  try {
    const [speakers, health] = await Promise.all([Streamd.get("/api/speakers"), Streamd.get("/api/health")]);
    const names = speakers.speakers.map((s) => s.name);
    choose("challenge-speaker", names);
    choose("challenge-stream", Object.keys(health.daemon.ok ? health.daemon.streams : health.streams).sort());
    if (!names.length) Streamd.say("challenge-message", "nobody is enrolled: enroll someone first", true);
  } catch (err) { Streamd.say("challenge-message", err.message, true); }
}

function choose(id, values) {
  const select = document.getElementById(id);
  const chosen = select.value; // a refresh keeps what was chosen
  select.replaceChildren(...values.map((v) => Streamd.el("option", { value: v }, v)));
  if (values.includes(chosen)) select.value = chosen;
}

function showVerdict(text, good) {
  const node = document.getElementById("challenge-verdict");
  node.textContent = text;
  node.className = `verdict ${good ? "good" : "bad"}`;
  clearInterval(countdown);
  document.getElementById("challenge-expires").textContent = "";
}

async function ask(e) {
  e.preventDefault();
  const speaker = document.getElementById("challenge-speaker").value;
  const stream = document.getElementById("challenge-stream").value;
  const length = Number(document.getElementById("challenge-length").value);
  try {
    const r = await Streamd.post("/api/challenge", { speaker, stream, length });
    open = { id: r.id, expires: r.expires };
    document.getElementById("challenge-card").hidden = false;
    document.getElementById("challenge-who").textContent = speaker;
    document.getElementById("challenge-code").textContent = r.digits.split("").join("-");
    document.getElementById("challenge-verdict").textContent = "";
    Streamd.say("challenge-message", `waiting for ${speaker} on ${r.stream}…`);
    clearInterval(countdown);
    countdown = setInterval(() => {
      const left = Math.max(0, open.expires - Date.now() / 1000);
      document.getElementById("challenge-expires").textContent = `${left.toFixed(0)} s left`;
    }, 250);
  } catch (err) { Streamd.say("challenge-message", err.message, true); }
}

function verification(ev) {
  if (ev.type !== "verification" || !open || ev.id !== open.id) return;
  open = null;
  const heard = ev.digits_heard === null || ev.digits_heard === undefined ? "no digits" : ev.digits_heard.split("").join("-");
  const voice = ev.voice_ok ? "their voice" : "not their voice";
  if (ev.result === "pass") showVerdict(`Passed: heard ${heard}, ${voice}.`, true);
  else showVerdict(`Failed (${ev.reason}): heard ${heard}, ${voice}.`, false);
  Streamd.say("challenge-message", "");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("challenge-form").addEventListener("submit", ask);
  fillChoices();
  const opened = Date.now() / 1000;
  Streamd.events((ev) => {
    verification(ev);
    if (ev.type === "gallery" && ev.time > opened) fillChoices();
  }, Streamd.connection);
});
