// lmtailor playground: chat with one model, or send the same message to two models side by side.
// Plain JS, no dependencies: answers stream from /v1/chat/completions (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const panes = {
  a: { el: $("pane-a"), select: $("model-a"), history: [] },
  b: { el: $("pane-b"), select: $("model-b"), history: [] },
};
let busy = 0;

$("apikey").value = localStorage.getItem("lmtailor-key") || "";
$("apikey").addEventListener("change", () => { localStorage.setItem("lmtailor-key", $("apikey").value); loadModels(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) { status("cannot list models: " + (await errorText(resp))); return; }
  const models = (await resp.json()).data;
  for (const pane of Object.values(panes)) {
    const keep = pane.select.value;
    pane.select.innerHTML = "";
    for (const m of models) pane.select.add(new Option(m.parent ? `${m.id} (on ${m.parent})` : m.id, m.id));
    if (keep) pane.select.value = keep;
  }
  // Side by side compares a tailored model with its base by default.
  const tuned = models.find((m) => m.parent);
  if (tuned && !panes.a.select.dataset.touched) {
    panes.a.select.value = tuned.id;
    panes.b.select.value = tuned.parent;
  } else if (models.length > 1 && !panes.b.select.dataset.touched) {
    panes.b.select.value = models[1].id;
  }
  titles();
  status(`${models.length} model(s) available`);
}

function titles() {
  for (const pane of Object.values(panes)) pane.el.querySelector(".pane-title").textContent = pane.select.value;
}

function reset() {
  for (const pane of Object.values(panes)) { pane.history = []; pane.el.querySelector(".log").innerHTML = ""; }
}

for (const pane of Object.values(panes)) {
  pane.select.addEventListener("change", () => { pane.select.dataset.touched = "1"; reset(); titles(); });
}
$("side-by-side").addEventListener("change", () => {
  const on = $("side-by-side").checked;
  panes.b.el.hidden = !on;
  panes.b.select.disabled = !on;
  reset();
});
$("reset").addEventListener("click", reset);

function bubble(pane, role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  pane.el.querySelector(".log").appendChild(div);
  pane.el.scrollTop = pane.el.scrollHeight;
  return div;
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch { return `HTTP ${resp.status}`; }
}

async function ask(pane, userText) {
  pane.history.push({ role: "user", content: userText });
  bubble(pane, "user", userText);
  const out = bubble(pane, "assistant streaming", "");
  const messages = [...pane.history];
  const system = $("system").value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const body = {
    model: pane.select.value, messages, stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { answer += delta.content; out.textContent = answer; }
        pane.el.scrollTop = pane.el.scrollHeight;
      }
    }
    pane.history.push({ role: "assistant", content: answer });
  } catch (err) {
    out.className = "msg error";
    out.textContent = "error: " + err.message;
    pane.history.pop();
  } finally {
    out.classList.remove("streaming");
  }
}

$("composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  $("prompt").value = "";
  const targets = $("side-by-side").checked ? [panes.a, panes.b] : [panes.a];
  busy = targets.length;
  $("send").disabled = true;
  status("generating...");
  await Promise.all(targets.map((p) => ask(p, text).finally(() => { busy -= 1; })));
  $("send").disabled = false;
  status("done");
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});

loadModels();
