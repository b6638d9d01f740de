// What every page of the console shares: requests with the CSRF token, the event stream,
// small formatting helpers. No framework, no build step.
"use strict";

const Streamd = {
  csrf() { return document.querySelector('meta[name="csrf-token"]').content; },

  async get(url) {
    const reply = await fetch(url, { headers: { Accept: "application/json" } });
    return Streamd.checked(reply);
  },

  async post(url, body) {
    const reply = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": Streamd.csrf() },
      body: JSON.stringify(body),
    });
    return Streamd.checked(reply);
  },

  async checked(reply) {
    if (reply.status === 401) { window.location.href = "/login"; }
    let body;
    try { body = await reply.json(); } catch (e) { throw new Error(`HTTP ${reply.status}`); }
    if (!body.ok) { throw new Error(body.error || `HTTP ${reply.status}`); }
    return body;
  },

  // Every daemon event, as it arrives; onState(true|false) when the stream opens or breaks.
  events(onEvent, onState) {
    const source = new EventSource("/api/events");
    source.onopen = () => onState(true);
    source.onerror = () => onState(false);
    source.onmessage = (m) => onEvent(JSON.parse(m.data));
    source.addEventListener("skipped", (m) => onEvent({ type: "console.skipped", ...JSON.parse(m.data) }));
    return source;
  },

  el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c === null || c === undefined ? "" : c);
    return node;
  },

  clock(unix) {
    if (!unix) return "–";
    return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
  },

  date(unix) {
    if (!unix) return "–";
    const d = new Date(unix * 1000);
    return `${d.toLocaleDateString()} ${d.toLocaleTimeString([], { hour12: false })}`;
  },

  ago(unix) {
    if (!unix) return "–";
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 90) return `${s.toFixed(0)} s ago`;
    if (s < 5400) return `${(s / 60).toFixed(0)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  },

  ms(seconds) { return seconds === null || seconds === undefined ? "–" : `${(seconds * 1000).toFixed(0)} ms`; },

  connection(up) {
    const node = document.getElementById("conn");
    node.className = `conn ${up ? "up" : "down"}`;
    node.textContent = up ? "live" : "reconnecting…";
  },

  say(id, text, bad = false) {
    const node = document.getElementById(id);
    node.textContent = text;
    node.className = `message ${bad ? "bad" : "good"}`;
  },
};

document.addEventListener("DOMContentLoaded", () => {
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.getAttribute("href") === window.location.pathname) a.classList.add("here");
  }
});
