// Chat and compare: answers streamed from the server's OpenAI-compatible
// /v1/chat/completions (server-sent events read from fetch, so the API key can be sent).
// Loaded before ui.js, which holds the shared helpers and starts the page.
"use strict";

// Stream a chat completion; onText(piece) for every piece; resolves with the finish reason.
async function streamChat(model, messages, params, onText, signal) {
  const body = { model, messages, stream: true, ...params };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return finish;
}


// ------------------------------------------------------------------ chat and compare

const PARAMS = [
  { name: "temperature", label: "temperature", value: "0.7", step: "0.1", min: "0", max: "2" },
  { name: "top_p", label: "top_p", value: "1", step: "0.05", min: "0.05", max: "1" },
  { name: "max_tokens", label: "max tokens", value: "128", step: "1", min: "1" },
  { name: "seed", label: "seed", value: "", step: "1", placeholder: "random" },
];

function buildParams(fieldset) {
  fieldset.append(element("legend", {}, "Sampling"));
  for (const p of PARAMS) {
    const input = element("input", { type: "number", name: p.name, step: p.step, placeholder: p.placeholder || "" });
    if (p.min) input.min = p.min;
    if (p.max) input.max = p.max;
    input.value = p.value;
    fieldset.append(element("label", {}, p.label, input));
  }
}

// The sampling fields as request fields; empty ones are left to the server's defaults.
function readParams(fieldset) {
  const params = {};
  for (const input of fieldset.querySelectorAll("input")) {
    if (input.value.trim() === "") continue;
    const value = Number(input.value);
    params[input.name] = input.name === "max_tokens" || input.name === "seed" ? Math.trunc(value) : value;
    if (!Number.isFinite(value)) params[input.name] = input.value; // the server names the field
  }
  return params;
}

function withSystem(system, messages) {
  return system.trim() ? [{ role: "system", content: system }, ...messages] : messages;
}

async function loadModels() {
  let models = [];
  try {
    models = (await getJSON("/v1/models")).data;
  } catch (error) {
    showError(error);
  }
  const chatSelect = $("chat-model");
  const previous = chatSelect.value;
  chatSelect.replaceChildren(...models.map((m) =>
    element("option", { value: m.id }, m.parent ? `${m.id} (adapter)` : `${m.id} (base)`)));
  if (models.some((m) => m.id === previous)) chatSelect.value = previous;
  const boxes = $("compare-models");
  const ticked = new Set([...boxes.querySelectorAll("input:checked")].map((b) => b.value));
  boxes.replaceChildren(...models.map((m) => {
    const box = element("input", { type: "checkbox", value: m.id });
    box.checked = ticked.size ? ticked.has(m.id) : true;
    return element("label", { class: "inline" }, box, m.parent ? `${m.id} (adapter)` : `${m.id} (base)`);
  }));
}

function addMessage(role, text) {
  const who = role === "user" ? "you" : $("chat-model").value;
  const body = element("span", { class: "text" }, text);
  const node = element("div", { class: "message " + role }, element("span", { class: "who" }, who), body);
  $("chat-log").append(node);
  return { node, body };
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value;
  if (!text.trim() || state.chatAbort) return;
  clearError();
  $("chat-input").value = "";
  state.chat.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  state.chatAbort = new AbortController();
  $("chat-stop").disabled = false;
  $("chat-submit").disabled = true;
  try {
    const messages = withSystem($("chat-system").value, state.chat);
    await streamChat($("chat-model").value, messages, readParams($("chat-params")),
      (piece) => { answer.body.textContent += piece; }, state.chatAbort.signal);
    state.chat.push({ role: "assistant", content: answer.body.textContent });
    answer.node.dataset.done = "true";
  } catch (error) {
    state.chat.pop(); // the question goes unanswered; ask again after fixing the cause
    answer.node.classList.add("error");
    answer.body.textContent = error.name === "AbortError" ? "(stopped)" : String(error.message);
    if (error.name !== "AbortError") showError(error);
  } finally {
    state.chatAbort = null;
    $("chat-stop").disabled = true;
    $("chat-submit").disabled = false;
  }
}

async function sendCompare(event) {
  event.preventDefault();
  const prompt = $("compare-input").value;
  const models = [...$("compare-models").querySelectorAll("input:checked")].map((b) => b.value);
  if (!prompt.trim()) return;
  clearError();
  if (models.length < 1) { showError(new Error("tick at least one model to compare")); return; }
  const messages = withSystem($("compare-system").value, [{ role: "user", content: prompt }]);
  const params = readParams($("compare-params"));
  const columns = $("compare-answers");
  columns.replaceChildren();
  const runs = models.map(async (model) => {
    const text = element("div", { class: "text" });
    const column = element("div", { class: "answer", "data-model": model }, element("h3", {}, model), text);
    columns.append(column);
    try {
      const finish = await streamChat(model, messages, params, (piece) => { text.textContent += piece; });
      column.dataset.done = finish || "stop";
      const why = finish === "length" ? "stopped at max tokens" : "finished";
      column.append(element("div", { class: "finish" }, why));
    } catch (error) {
      text.classList.add("error");
      text.textContent = String(error.message);
      column.dataset.done = "error";
      showError(error);
    }
  });
  $("compare-submit").disabled = true;
  await Promise.all(runs); // all requests are in flight together; the server batches them
  $("compare-submit").disabled = false;
}

async function loadAdapter() {
  const body = { lora_name: $("load-name").value.trim(), lora_path: $("load-path").value.trim() };
  $("load-result").textContent = "loading…";
  try {
    const response = await fetch("/v1/load_lora_adapter", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!response.ok) throw await errorOf(response);
    $("load-result").textContent = `loaded ${body.lora_name}`;
    await loadModels();
  } catch (error) {
    $("load-result").textContent = "";
    showError(error);
  }
}
