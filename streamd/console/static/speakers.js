// Speakers: the gallery, with rename, remove (after a confirmation that says what is erased)
// and export; the audit trail shows each change.
"use strict";

function renameForm(name) {
  const $ = Streamd.el;
  const input = $("input", { type: "text", value: name, "aria-label": `new name for ${name}`, class: "new-name" });
  const form = $("form", { class: "inline rename-form" }, input, $("button", { class: "primary", type: "submit" }, "Save"),
    $("button", { type: "button", onclick: () => load() }, "Cancel"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await Streamd.post("/api/speakers/rename", { name, new_name: input.value });
      Streamd.say("message", `renamed ${name} to ${input.value.trim()}`);
    } catch (err) { Streamd.say("message", err.message, true); }
    load();
  });
  return form;
}

function confirmRemove(name) {
  const dialog = document.getElementById("confirm-remove");
  document.getElementById("remove-name").textContent = name;
  dialog.onclose = async () => {
    if (dialog.returnValue !== "erase") return;
    try {
      const r = await Streamd.post("/api/speakers/remove", { name });
      const clusters = r.clusters && r.clusters.length ? ` and the clusters ${r.clusters.join(", ")}` : "";
      Streamd.say("message", `removed ${name}${clusters}: their data is erased`);
    } catch (err) { Streamd.say("message", err.message, true); }
    load();
  };
  dialog.returnValue = "";
  dialog.showModal();
}

function speakerRow(s) {
  const $ = Streamd.el;
  const actions = $("div", { class: "actions" });
  actions.append(
    $("button", { class: "rename", onclick: () => actions.replaceChildren(renameForm(s.name)) }, "Rename"),
    $("button", { class: "remove", onclick: () => confirmRemove(s.name) }, "Remove"),
    $("a", { href: `/api/speakers/export?name=${encodeURIComponent(s.name)}`, download: `streamd-${s.name}.json`,
      class: "export button" }, "Export"));
  return $("tr", { "data-name": s.name },
    $("td", { class: "named" }, s.name), $("td", { class: "num" }, `${s.seconds.toFixed(1)} s`),
    $("td", { class: "num" }, String(s.utterances)), $("td", {}, Streamd.date(s.created)),
    $("td", {}, Streamd.date(s.updated)), $("td", {}, s.last_heard ? Streamd.ago(s.last_heard) : "not since the console started"),
    $("td", {}, actions));
}

function auditRow(a) {
  const $ = Streamd.el;
  return $("tr", { "data-action": a.action },
    $("td", {}, Streamd.date(a.time)), $("td", {}, a.who), $("td", {}, a.action),
    $("td", {}, a.name === null ? "(removed)" : a.name), $("td", {}, a.subject));
}

async function load() {
  try {
    const r = await Streamd.get("/api/speakers");
    document.querySelector("#speakers tbody").replaceChildren(...r.speakers.map(speakerRow));
    document.getElementById("empty").hidden = r.speakers.length > 0;
    const a = await Streamd.get("/api/audit");
    document.querySelector("#audit tbody").replaceChildren(...a.audit.slice(-30).reverse().map(auditRow));
  } catch (err) { Streamd.say("message", err.message, true); }
}

document.addEventListener("DOMContentLoaded", () => {
  load();
  // A change made anywhere (another console, `streamd speakers`) shows here at once.
  Streamd.events((ev) => { if (ev.type === "gallery" && ev.time > opened) load(); }, Streamd.connection);
});
const opened = Date.now() / 1000;
