// The page: wires the controls to a live session (live.js), file jobs (files.js) and the
// transcript (transcript.js), and says what went wrong in words a person can act on.
//
// What it knows about the server comes from /page-config.json (same origin): the WebSocket's
// path, whether a key is needed, the file route, the model's frame, delay and VAD heads.

import { FileJob, HttpError } from "./files.js";
import { LiveSession, MicError } from "./live.js";
import { Transcript, TranscriptView } from "./transcript.js";

const KEY_STORAGE = "dsm-stt.api-key"; // sessionStorage: gone when the tab closes

const $ = (id) => document.getElementById(id);
const ui = {
  keyRow: $("key-row"),
  key: $("api-key"),
  start: $("start"),
  stop: $("stop"),
  reconnect: $("reconnect"),
  status: $("status"),
  message: $("message"),
  vad: $("vad"),
  vadFill: document.querySelector("#vad .fill"),
  vadValue: $("vad-value"),
  vadRule: $("vad-rule"),
  latency: $("latency"),
  latencyNote: $("latency-note"),
  level: $("level"),
  levelFill: document.querySelector("#level .fill"),
  transcript: $("transcript"),
  source: $("source"),
  copy: $("copy"),
  clear: $("clear"),
  downloads: document.querySelectorAll("[data-download]"),
  drop: $("drop"),
  file: $("file"),
  fileProgress: $("file-progress"),
  fileStatus: $("file-status"),
  model: $("model"),
};

const state = {
  config: null,
  session: null,
  transcript: null,
  view: new TranscriptView(ui.transcript),
  timeBase: 0, // seconds of earlier sessions of this microphone transcript
  latencies: [],
  fileJob: null,
  busy: false, // a file is being transcribed
};

// -- messages ---------------------------------------------------------------------------------

function say(text) {
  ui.status.textContent = text;
}

function problem(kind, text, { reconnect = false } = {}) {
  ui.message.hidden = false;
  ui.message.dataset.kind = kind;
  ui.message.textContent = text;
  ui.reconnect.hidden = !reconnect;
  if (kind === "key") ui.key.focus();
}

function clearProblem() {
  ui.message.hidden = true;
  ui.message.textContent = "";
  delete ui.message.dataset.kind;
  ui.reconnect.hidden = true;
}

function apiKey() {
  return ui.key.value.trim();
}

function keyHeaders() {
  const key = apiKey();
  return key ? { "kyutai-api-key": key } : {};
}

const KEY_REFUSED = "The server refused the API key. Check it and try again.";
const KEY_MISSING = "This server needs an API key: enter it above, then try again.";

// Why did the socket fail before it opened? The browser does not say (a refused upgrade is a
// bare error), so ask the server.
async function whyRefused() {
  try {
    const answer = await fetch("/page/key", { headers: keyHeaders(), cache: "no-store" });
    if (answer.status === 401) return ["key", apiKey() ? KEY_REFUSED : KEY_MISSING];
    return [
      "refused",
      "The server refused the connection (it may be shutting down, be at its connection " +
        "limit, or not accept this page's origin).",
    ];
  } catch {
    return ["connection", "The server cannot be reached. Is it running?"];
  }
}

// -- transcript -------------------------------------------------------------------------------

function newTranscript(source, name) {
  const transcript = new Transcript(source, name);
  state.transcript = transcript;
  state.timeBase = 0;
  state.view.show(transcript);
  ui.source.textContent = source === "mic" ? "Microphone" : name;
  updateActions();
  transcript.onChange(() => updateActions());
  return transcript;
}

function updateActions() {
  const has = Boolean(state.transcript && state.transcript.words.length);
  ui.copy.disabled = !has;
  ui.clear.disabled = !has || Boolean(state.session) || state.busy;
  for (const button of ui.downloads) button.disabled = !has || state.busy;
}

async function copyText() {
  const text = state.transcript.text();
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // no clipboard API (a page on plain http other than localhost): the old way
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  say("The text is copied.");
}

function baseName() {
  const t = state.transcript;
  if (t.source === "mic") return "transcript";
  return (t.name || "transcript").replace(/\.[^.]+$/, "") || "transcript";
}

function saveFile(text, name, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

const TYPES = {
  txt: "text/plain",
  srt: "application/x-subrip",
  vtt: "text/vtt",
  json: "application/json",
};

async function download(format) {
  const t = state.transcript;
  const name = `${baseName()}.${format}`;
  if (format === "txt") {
    saveFile(t.text() + "\n", name, TYPES.txt);
    return;
  }
  try {
    if (!t.timed && state.fileJob) {
      // the streamed words have no times: ask for them once (the file is transcribed again)
      state.busy = true;
      updateActions();
      showFileProgress("Getting the words' times (the file is transcribed again)…", null);
      const timed = await state.fileJob.timings((f) => showFileProgress(null, f));
      t.setWords(timed.words, timed.duration, timed.segments);
      hideFileProgress("Word times ready.");
    }
    const answer = await fetch(`/page/render?format=${format}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...keyHeaders() },
      body: JSON.stringify(t.forRender(state.config.model)),
    });
    if (answer.status === 401) return problem("key", KEY_REFUSED);
    if (!answer.ok) throw new Error(await answer.text());
    saveFile(await answer.text(), name, TYPES[format]);
  } catch (err) {
    hideFileProgress("");
    problem("download", `The ${format} file could not be made: ${err.message}`);
  } finally {
    state.busy = false;
    updateActions();
  }
  return undefined;
}

// -- the live session -------------------------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`${scheme}//${location.host}${state.config.ws_path}`);
  const key = apiKey();
  if (key) url.searchParams.set("auth_id", key); // browsers cannot set a socket's headers
  // the server tells the ends of turn (EndOfTurn), decided by engine/turns.py on the VAD head
  if (state.config.vad) url.searchParams.set("end_of_turn", "1");
  return url.toString();
}

function setLive(live) {
  ui.start.disabled = live || state.busy;
  ui.stop.disabled = !live;
  ui.file.disabled = live;
  ui.drop.classList.toggle("disabled", live);
  document.body.classList.toggle("live", live);
  updateActions();
}

async function startMic() {
  clearProblem();
  const config = state.config;
  if (config.auth_required && !apiKey()) return problem("key", KEY_MISSING);
  if (!state.transcript || state.transcript.source !== "mic") newTranscript("mic", "microphone");
  const transcript = state.transcript;
  state.timeBase = transcript.duration;
  state.latencies = [];
  showLatency(null);
  const session = new LiveSession({
    url: wsUrl(),
    sampleRate: config.sample_rate,
    frameSize: config.frame_size,
  });
  state.session = session;
  setLive(true);
  say("Asking for the microphone…");
  const at = (seconds) => state.timeBase + seconds;
  let refused = null;
  session.addEventListener("open", () => say("Connected; waiting for a free slot…"));
  session.addEventListener("ready", () => say("Listening: speak."));
  session.addEventListener("word", ({ detail }) => {
    transcript.addWord(detail.text, at(detail.start));
    if (detail.latency !== null) showLatency(detail.latency);
  });
  session.addEventListener("endword", ({ detail }) => transcript.endWord(at(detail.stop)));
  session.addEventListener("step", ({ detail }) => {
    transcript.duration = at(session.secondsSent);
    const p = detail.prs[config.end_of_turn.head];
    if (p !== undefined) showVad(p);
  });
  session.addEventListener("endofturn", ({ detail }) => transcript.closeTurn(at(detail.time)));
  session.addEventListener("level", ({ detail }) => showLevel(detail.rms));
  session.addEventListener("refused", ({ detail }) => {
    refused = detail.message;
  });
  session.addEventListener("servererror", ({ detail }) => {
    problem("server", `The server says: ${detail.message}`);
  });
  session.addEventListener("micended", () => problem("mic", "The microphone went away."));
  session.addEventListener("closed", async ({ detail }) => {
    state.session = null;
    transcript.duration = at(session.secondsSent);
    transcript.finish(transcript.duration);
    setLive(false);
    showLevel(0);
    if (refused !== null) {
      if (refused.includes("no free channels")) {
        problem(
          "full",
          "The server is full: every slot is taken by other sessions. Try again in a moment.",
          { reconnect: true },
        );
      } else {
        problem("refused", `The server refused the session: ${refused}`, { reconnect: true });
      }
      say("Not connected.");
    } else if (!detail.opened) {
      const [kind, text] = await whyRefused();
      problem(kind, text, { reconnect: kind !== "key" });
      say("Not connected.");
    } else if (detail.clean) {
      say("Stopped.");
    } else if (detail.code === 1001) {
      problem("dropped", "The server is shutting down; the session ended.", { reconnect: true });
      say("Disconnected.");
    } else {
      const why = detail.reason ? `: ${detail.reason}` : "";
      problem("dropped", `The connection dropped (code ${detail.code}${why}).`, {
        reconnect: true,
      });
      say("Disconnected.");
    }
  });
  try {
    await session.start();
    say("Connecting…");
  } catch (err) {
    state.session = null;
    session.release();
    setLive(false);
    say("Not listening.");
    if (err instanceof MicError) problem("mic", err.message);
    else problem("mic", `The audio could not be started: ${err.message}`);
  }
  return undefined;
}

async function stopMic() {
  if (!state.session) return;
  ui.stop.disabled = true;
  say("Finishing the last words…");
  await state.session.stop();
}

function showVad(p) {
  const value = Math.max(0, Math.min(1, p));
  ui.vadFill.style.width = `${(value * 100).toFixed(1)}%`;
  ui.vad.setAttribute("aria-valuenow", value.toFixed(3));
  ui.vad.classList.toggle("over", value >= state.config.end_of_turn.threshold);
  ui.vadValue.textContent = value.toFixed(2);
}

function showLevel(rms) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -100;
  const fraction = Math.max(0, Math.min(1, (db + 60) / 60)); // -60 dBFS .. 0
  ui.levelFill.style.width = `${(fraction * 100).toFixed(1)}%`;
}

function showLatency(ms) {
  if (ms === null) {
    ui.latency.textContent = "–";
    return;
  }
  state.latencies.push(ms);
  const sorted = [...state.latencies].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  ui.latency.textContent = `${Math.round(ms)} ms`;
  ui.latency.dataset.ms = String(Math.round(ms));
  ui.latencyNote.textContent = `median ${Math.round(median)} ms over ${sorted.length} words`;
}

// -- files ------------------------------------------------------------------------------------

function showFileProgress(text, fraction) {
  ui.fileProgress.hidden = false;
  if (fraction === null || fraction === undefined) ui.fileProgress.removeAttribute("value");
  else ui.fileProgress.value = fraction;
  if (text !== null) ui.fileStatus.textContent = text;
}

function hideFileProgress(text) {
  ui.fileProgress.hidden = true;
  ui.fileStatus.textContent = text;
}

function fileProblem(err) {
  if (!(err instanceof HttpError)) return problem("file", `The file failed: ${err.message}`);
  if (err.status === 401) return problem("key", apiKey() ? KEY_REFUSED : KEY_MISSING);
  if (err.status === 503) {
    return problem("full", `The server is busy: ${err.message || "no free slot"}. Try again soon.`);
  }
  if (err.status === 413) {
    const limit = state.config.max_upload_mb;
    return problem("file", `The file is larger than the server takes (${limit} MiB).`);
  }
  if (err.status === 0) return problem("dropped", "The connection to the server failed.");
  if (err.status === -1) return undefined;
  return problem("file", `The server could not transcribe the file: ${err.message}`);
}

async function transcribeFile(file) {
  if (!file || state.session || state.busy) return;
  clearProblem();
  const config = state.config;
  if (config.auth_required && !apiKey()) {
    problem("key", KEY_MISSING);
    return;
  }
  const transcript = newTranscript("file", file.name);
  transcript.timed = false;
  const job = new FileJob({
    file,
    route: config.file_route,
    model: config.model,
    key: apiKey(),
  });
  state.fileJob = job;
  state.busy = true;
  ui.start.disabled = true;
  updateActions();
  let words = 0;
  showFileProgress(`Uploading ${file.name}…`, 0);
  try {
    await job.run({
      onUpload: (fraction) => {
        if (fraction < 1) showFileProgress(`Uploading ${file.name}: ${Math.round(fraction * 100)} %`, fraction);
        else showFileProgress(`Transcribing ${file.name}…`, null);
      },
      onWord: (text) => {
        if (transcript.addWord(text, 0)) words += 1;
        showFileProgress(`Transcribing ${file.name}: ${words} words so far…`, null);
      },
    });
    transcript.finish(0);
    hideFileProgress(`${file.name}: ${transcript.words.length} words.`);
    say("File done.");
  } catch (err) {
    hideFileProgress("");
    fileProblem(err);
  } finally {
    state.busy = false;
    ui.start.disabled = false;
    updateActions();
  }
}

function setUpDropZone() {
  const zone = ui.drop;
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      if (!ui.file.disabled) zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file && !ui.file.disabled) transcribeFile(file);
  });
  ui.file.addEventListener("change", () => {
    const file = ui.file.files[0];
    ui.file.value = ""; // the same file can be picked again
    transcribeFile(file);
  });
  // a file dropped anywhere else would make the browser leave the page
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
}

// -- start ------------------------------------------------------------------------------------

async function main() {
  try {
    const answer = await fetch("/page-config.json", { cache: "no-store" });
    state.config = await answer.json();
  } catch (err) {
    problem("connection", `The server cannot be reached (${err.message}). Reload the page.`);
    ui.start.disabled = true;
    return;
  }
  const config = state.config;
  ui.model.textContent = `${config.model} · dsm-stt ${config.version}`;
  ui.keyRow.hidden = !config.auth_required;
  ui.key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  ui.key.addEventListener("input", () => {
    if (ui.key.value) sessionStorage.setItem(KEY_STORAGE, ui.key.value);
    else sessionStorage.removeItem(KEY_STORAGE);
    if (ui.message.dataset.kind === "key") clearProblem();
  });
  const rule = config.end_of_turn;
  if (config.vad) {
    ui.vadRule.textContent = `A turn ends when VAD head ${rule.head} reaches ${rule.threshold}.`;
  } else {
    ui.vadRule.textContent = "This model has no VAD heads: no end-of-turn meter.";
    ui.vad.classList.add("off");
  }
  const delay = Math.round(config.delay_seconds * 1000);
  ui.latencyNote.textContent = `the model's own delay is ${delay} ms`;
  ui.start.addEventListener("click", startMic);
  ui.stop.addEventListener("click", stopMic);
  ui.reconnect.addEventListener("click", startMic);
  ui.copy.addEventListener("click", copyText);
  ui.clear.addEventListener("click", () => {
    state.transcript = null;
    state.fileJob = null;
    state.view.transcript = null;
    state.view.redraw();
    ui.source.textContent = "";
    ui.transcript.classList.add("empty");
    hideFileProgress("");
    updateActions();
  });
  for (const button of ui.downloads) {
    button.addEventListener("click", () => download(button.dataset.download));
  }
  setUpDropZone();
  setLive(false);
  say("Press Start and speak, or drop a file.");
  document.body.dataset.ready = "true";
}

main();
