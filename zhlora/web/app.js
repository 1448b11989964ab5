// The chat page: picks a model from /v1/models, streams answers from /v1/chat/completions
// (fetch + ReadableStream over server-sent events), and in compare mode asks base and the
// chosen adapter the same question side by side. Every text from a user or a model is put
// in the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: [],   // ids from /v1/models
  panes: [],    // [{model, history: [{role, content}], list: element}]
  running: [],  // AbortControllers of the answers being streamed
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body.error?.message || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

// ---- models -------------------------------------------------------------------------

async function loadModels() {
  setStatus("连接中… Connecting", "loading");
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) {
      setStatus("需要 API 密钥 API key required", "error");
      $("api-key").classList.add("attention");
      $("api-key").focus();
      return;
    }
    if (!res.ok) throw new Error(await errorMessage(res));
    $("api-key").classList.remove("attention");
    state.models = (await res.json()).data.map((m) => m.id);
  } catch (err) {
    setStatus(`无法连接 Cannot connect: ${err.message}`, "error");
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((id) => new Option(modelLabel(id), id)));
  const adapters = state.models.filter((id) => id !== "base");
  select.value = state.models.includes(previous) ? previous : (adapters[0] || state.models[0]);
  $("compare").disabled = !state.models.includes("base") || adapters.length === 0;
  setStatus(`已连接 Connected · ${state.models.length} 个模型 models`, "ok");
  layoutPanes();
}

function modelLabel(id) {
  return id === "base" ? "base · 基础模型 (未微调)" : `${id} · LoRA adapter`;
}

// ---- panes and bubbles --------------------------------------------------------------

// One pane normally; two (base | adapter) in compare mode. Changing the layout starts a new
// conversation, since each pane keeps the history its own model answered.
function layoutPanes() {
  stopAll();
  const chosen = $("model").value;
  const compare = $("compare").checked && !$("compare").disabled;
  let models = [chosen];
  if (compare) {
    const adapter = chosen !== "base" ? chosen : state.models.find((id) => id !== "base");
    models = ["base", adapter];
  }
  state.panes = models.map((model) => ({ model, history: [], list: null }));
  const panes = $("panes");
  panes.classList.toggle("compare", compare);
  panes.replaceChildren(...state.panes.map((pane, i) => {
    const box = document.createElement("div");
    box.className = "pane";
    box.dataset.model = pane.model;
    const title = document.createElement("div");
    title.className = "pane-title";
    const [name, zh, en] = !compare ? ["", "对话", "Conversation"]
      : pane.model === "base" ? ["base", "微调前", "before fine-tuning"] : [pane.model, "微调后", "after fine-tuning"];
    const english = document.createElement("span");
    english.className = "en";
    english.textContent = en;
    title.append(name ? `${name} · ${zh} ` : `${zh} `, english);
    pane.list = document.createElement("div");
    pane.list.className = "messages";
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = i > 0 ? "" : compare
      ? "对比模式: 同一个问题, 左边 base, 右边 adapter。 Compare mode: one question, two models."
      : "输入问题开始对话。 Ask something to start.";
    pane.list.append(empty);
    box.append(title, pane.list);
    return box;
  }));
}

function addBubble(pane, role, text, model) {
  pane.list.querySelector(".empty")?.remove();
  const bubble = document.createElement("div");
  bubble.className = `bubble ${role}`;
  if (role === "assistant") {
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = model === "base" ? "base" : model;
    bubble.append(who);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  bubble.append(body);
  pane.list.append(bubble);
  pane.list.scrollTop = pane.list.scrollHeight;
  return bubble;
}

// ---- asking -------------------------------------------------------------------------

function settings() {
  const number = (id, fallback) => {
    const value = parseFloat($(id).value);
    return Number.isFinite(value) ? value : fallback;
  };
  return {
    temperature: number("temperature", 0.7),
    top_p: number("top-p", 0.9),
    max_tokens: Math.round(number("max-tokens", 256)),
  };
}

// Stream one answer into `bubble`; returns its text. Throws with the server's message on an error.
async function streamAnswer(model, messages, bubble, signal) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...settings() }),
  });
  if (!res.ok) throw new Error(await errorMessage(res));
  const text = bubble.querySelector(".text");
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const began = performance.now();
  let buffer = "", answer = "", chunks = 0, finish = null, usage = null;
  bubble.dataset.state = "streaming";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {  // one SSE event per blank-line-terminated block
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (choice?.delta?.content) {
          answer += choice.delta.content;
          chunks += 1;
          text.textContent = answer;
          bubble.dataset.chunks = String(chunks);
          bubble.parentElement.scrollTop = bubble.parentElement.scrollHeight;
        }
      }
    }
  }
  const seconds = ((performance.now() - began) / 1000).toFixed(1);
  const meta = document.createElement("div");
  meta.className = "meta";
  const tokens = usage ? `${usage.completion_tokens} tokens · ` : "";
  const cut = finish === "length" ? " · 达到 max_tokens (cut at max_tokens)" : "";
  meta.textContent = `${tokens}${seconds} s${cut}`;
  bubble.append(meta);
  text.textContent = answer.trimEnd() || "(空回答 empty answer)";
  return answer;
}

async function ask(question) {
  const system = $("system").value.trim();
  $("send").disabled = true;
  $("stop").disabled = false;
  await Promise.all(state.panes.map(async (pane) => {
    const model = $("compare").checked ? pane.model : $("model").value;  // single mode: switchable mid-chat
    pane.history.push({ role: "user", content: question });
    addBubble(pane, "user", question);
    const bubble = addBubble(pane, "assistant", "…", model);
    bubble.dataset.state = "waiting";
    const controller = new AbortController();
    state.running.push(controller);
    const messages = (system ? [{ role: "system", content: system }] : []).concat(pane.history);
    try {
      const answer = await streamAnswer(model, messages, bubble, controller.signal);
      pane.history.push({ role: "assistant", content: answer });
      bubble.dataset.state = "done";
    } catch (err) {
      pane.history.pop();  // the question stays on screen, not in what the model sees next
      bubble.dataset.state = "error";
      bubble.querySelector(".text").textContent = err.name === "AbortError"
        ? "已停止 (stopped)" : `出错了 Error: ${err.message}`;
      if (String(err.message).includes("API key")) loadModels();
    }
  }));
  state.running = [];
  $("send").disabled = false;
  $("stop").disabled = true;
}

function stopAll() {
  state.running.forEach((controller) => controller.abort());  // the server stops generating too
  state.running = [];
}

// ---- wiring -------------------------------------------------------------------------

function init() {
  $("api-key").value = sessionStorage.getItem("zhlora-api-key") || "";  // this tab only, never on disk
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("zhlora-api-key", $("api-key").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", () => { if ($("compare").checked) layoutPanes(); });
  $("compare").addEventListener("change", layoutPanes);
  $("clear").addEventListener("click", layoutPanes);
  $("stop").addEventListener("click", stopAll);
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || $("send").disabled || !state.panes.length) return;
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {  // isComposing: Chinese IME
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  loadModels();
}

init();
