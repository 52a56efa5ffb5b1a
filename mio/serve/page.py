"""The chat page served at ``/``: one self-contained HTML file that talks to the server's own
``/v1/chat/completions`` with ``stream: true``.

The user types text, may attach an image or a WAV (sent as a ``data:`` URL / ``input_audio``),
and ticks which outputs the answer may use (text, image, audio). Text streams into the answer as
it is decoded; each image arrives as an ``<img>`` when its block closes, each speech block as an
``<audio>`` element. Earlier turns go back to the model as their text (and the user's own
attachments); the answer's media stay on the page. With an API key set on the server, the page
asks for it and keeps it in the browser's local storage.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mio chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 820px; padding: 1rem; color: #222; }
#log { display: flex; flex-direction: column; gap: .6rem; margin-bottom: 1rem; }
.msg { padding: .5rem .75rem; border-radius: 8px; white-space: pre-wrap; }
.user { background: #e8f0fe; align-self: flex-end; max-width: 85%; }
.assistant { background: #f3f3f3; align-self: flex-start; max-width: 85%; }
.msg img { display: block; max-width: 256px; margin: .3rem 0; border-radius: 4px; }
.msg audio { display: block; margin: .3rem 0; }
.error { color: #b00020; }
form { display: grid; gap: .5rem; }
textarea { width: 100%; min-height: 4rem; font: inherit; box-sizing: border-box; }
.row { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
</style></head>
<body>
<h1>mio</h1>
<div id="log"></div>
<form id="ask">
  <textarea id="prompt" placeholder="Ask something; attach an image or a WAV"></textarea>
  <div class="row">
    <input id="file" type="file" accept="image/*,.wav,audio/wav,audio/x-wav">
    <span>answer with:
      <label><input type="checkbox" id="out-text" value="text" checked> text</label>
      <label><input type="checkbox" id="out-image" value="image"> image</label>
      <label><input type="checkbox" id="out-audio" value="audio"> speech</label></span>
    <label>max tokens <input id="max-tokens" type="number" min="1" value="256" style="width:5em"></label>
  </div>
  <div class="row">
    <button id="send" type="submit">Send</button>
    <button id="reset" type="button">New chat</button>
    <label>API key <input id="api-key" type="password" autocomplete="off" style="width:10em"></label>
  </div>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} as sent back to the model: text and the user's own attachments
let model = null;
$("api-key").value = localStorage.getItem("mio-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("mio-api-key", $("api-key").value));
$("reset").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("api-key").value) h["Authorization"] = "Bearer " + $("api-key").value;
  return h;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("log").appendChild(div);
  return div;
}

function addImage(where, url) { const img = document.createElement("img"); img.src = url; where.appendChild(img); }
function addAudio(where, url) { const a = document.createElement("audio"); a.controls = true; a.src = url; where.appendChild(a); }

async function modelId() {
  if (model) return model;
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  model = body.data[0].id;
  return model;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  const file = $("file").files[0];
  const outputs = ["out-text", "out-image", "out-audio"].filter((id) => $(id).checked).map((id) => $(id).value);
  if (!text.trim() && !file) return;
  const user = bubble("user");
  const content = [];
  if (file) {
    const url = await readDataURL(file);
    if (file.type.startsWith("image/")) {
      content.push({type: "image_url", image_url: {url}});
      addImage(user, url);
    } else {
      content.push({type: "input_audio", input_audio: {data: url.split(",", 2)[1], format: "wav"}});
      addAudio(user, url);
    }
  }
  if (text.trim()) { content.push({type: "text", text}); user.appendChild(document.createTextNode(text)); }
  $("prompt").value = ""; $("file").value = "";
  const answer = bubble("assistant");
  answer.dataset.state = "streaming";
  const textNode = document.createElement("span");
  answer.appendChild(textNode);
  let said = "";
  $("send").disabled = true;
  try {
    const body = {model: await modelId(), messages: [...history, {role: "user", content}], stream: true,
                  modalities: outputs.length ? outputs : ["text"], max_tokens: Number($("max-tokens").value) || 256};
    if (outputs.includes("audio")) body.audio = {voice: "default", format: "wav"};
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message : r.statusText); }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const delta = event.choices[0].delta;
        if (typeof delta.content === "string") { said += delta.content; textNode.textContent = said; }
        else if (Array.isArray(delta.content)) {
          for (const part of delta.content) if (part.type === "image_url") addImage(answer, part.image_url.url);
        }
        if (delta.audio && delta.audio.data) addAudio(answer, "data:audio/wav;base64," + delta.audio.data);
      }
    }
    if (said.trim() && content.some((p) => p.type === "text" || p.type === "image_url" || p.type === "input_audio")) {
      history.push({role: "user", content}, {role: "assistant", content: said});
    }
    answer.dataset.state = "done";
  } catch (err) {
    const e = document.createElement("div");
    e.className = "error";
    e.textContent = String(err.message || err);
    answer.appendChild(e);
    answer.dataset.state = "error";
  } finally {
    $("send").disabled = false;
  }
}
$("ask").addEventListener("submit", send);
</script>
</body></html>
"""
