// One live session: the microphone, captured by worklet.js, streamed to the server's WebSocket
// as moshi `Audio{pcm}` frames; what the server says comes back as events.
//
// Events (CustomEvent.detail):
//   open                   connected; the server may still be looking for a free slot
//   ready                  the server took us: audio flows from now on
//   word {text, start, latency}   start: seconds of this session's audio; latency: ms from the
//                          moment the page had the audio of the word's start to its arrival
//   endword {stop}         end of the previous word
//   step {prs, index}      one model step's VAD probabilities
//   endofturn {time, probability, head}   the server's end of turn (sessions that asked)
//   level {rms}            the microphone's level, per frame
//   refused {reason, message}   the server said no (Error) before or instead of Ready
//   servererror {message}  an Error during the session (it goes on)
//   closed {code, reason, clean, opened}   the socket is gone
//
// The audio clock: the first frame sent after Ready is time 0, as the server counts; each
// frame's capture time (performance.now() when the worklet posted it) is kept so that a word's
// latency can be measured when it arrives.

import { decode, encode } from "./msgpack.js";

const FLUSH_ID = 1;
const FLUSH_WAIT_MS = 4000; // the most we wait for the last words after Stop

export class MicError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

export class LiveSession extends EventTarget {
  constructor({ url, sampleRate, frameSize }) {
    super();
    this.url = url;
    this.sampleRate = sampleRate;
    this.frameSize = frameSize;
    this.ws = null;
    this.stream = null;
    this.context = null;
    this.node = null;
    this.ready = false;
    this.stopping = false;
    this.framesSent = 0;
    this.captureTimes = []; // performance.now() when frame i was complete
    this.flushed = null;
  }

  get secondsSent() {
    return (this.framesSent * this.frameSize) / this.sampleRate;
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ask for the microphone, then connect; throws MicError when the microphone cannot be had
  async start() {
    await this.openMicrophone();
    this.connect();
  }

  async openMicrophone() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicError(
        "insecure",
        "This browser gives the microphone only to https:// pages and localhost. Open the page " +
          "through https, or on the machine that runs the server (http://localhost:…).",
      );
    }
    // created before the first await, while the click that started us still counts as the
    // user's gesture (Safari starts an audio context only then)
    const context = new AudioContext();
    this.context = context;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: 1,
          // the model wants the voice as it is: no processing that shapes it
          echoCancellation: false,
          noiseSuppression: false,
          autoGainControl: false,
        },
      });
    } catch (err) {
      throw micError(err);
    }
    await context.audioWorklet.addModule(new URL("./worklet.js", import.meta.url));
    const source = context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(context, "dsm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: this.sampleRate, frameSize: this.frameSize },
    });
    this.node.port.onmessage = (event) => this.onFrame(event.data);
    // a silent path to the output keeps the graph pulling the worklet in every browser
    const mute = context.createGain();
    mute.gain.value = 0;
    source.connect(this.node).connect(mute).connect(context.destination);
    if (context.state === "suspended") await context.resume();
    for (const track of this.stream.getAudioTracks()) {
      track.addEventListener("ended", () => {
        this.emit("micended");
        this.stop();
      });
    }
  }

  connect() {
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.emit("open");
    };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") return;
      let msg;
      try {
        msg = decode(new Uint8Array(event.data));
      } catch (err) {
        this.emit("servererror", { message: `unreadable message from the server: ${err.message}` });
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = (event) => {
      this.ready = false;
      this.release();
      if (this.flushed) this.flushed();
      this.emit("closed", {
        code: event.code,
        reason: event.reason,
        clean: this.stopping,
        opened,
      });
    };
  }

  onMessage(msg) {
    switch (msg.type) {
      case "Ready":
        this.ready = true;
        this.emit("ready");
        break;
      case "Word": {
        const start = Number(msg.start_time);
        this.emit("word", { text: String(msg.text), start, latency: this.latencyOf(start) });
        break;
      }
      case "EndWord":
        this.emit("endword", { stop: Number(msg.stop_time) });
        break;
      case "Step":
        this.emit("step", { prs: msg.prs || [], index: msg.step_idx });
        break;
      case "EndOfTurn":
        this.emit("endofturn", {
          time: Number(msg.time),
          probability: Number(msg.probability),
          head: msg.head,
        });
        break;
      case "Flushed":
        if (msg.id === FLUSH_ID && this.flushed) this.flushed();
        break;
      case "Error":
        if (!this.ready) this.emit("refused", { message: String(msg.message) });
        else this.emit("servererror", { message: String(msg.message) });
        break;
      default:
        break; // Marker, and what a newer server may add
    }
  }

  onFrame(frame) {
    let sum = 0;
    for (let i = 0; i < frame.length; i++) sum += frame[i] * frame[i];
    this.emit("level", { rms: Math.sqrt(sum / frame.length) });
    if (!this.ready || this.stopping || this.ws.readyState !== WebSocket.OPEN) return;
    this.captureTimes.push(performance.now());
    this.framesSent += 1;
    this.ws.send(encode({ type: "Audio", pcm: frame }));
  }

  // ms from when the page had the audio at `start` (seconds of this session) until now
  latencyOf(start) {
    const frameSeconds = this.frameSize / this.sampleRate;
    const index = Math.min(Math.max(0, Math.floor(start / frameSeconds)), this.framesSent - 1);
    if (index < 0) return null;
    // the frame was complete at captureTimes[index]; the word's start is earlier in it
    const lead = ((index + 1) * frameSeconds - Math.max(start, 0)) * 1000;
    return performance.now() - (this.captureTimes[index] - lead);
  }

  // Stop: no more audio; the server is asked for the words of what it has (Flush) and the
  // session ends when they are in (or after FLUSH_WAIT_MS)
  async stop() {
    if (this.stopping) return;
    this.stopping = true;
    this.release();
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN && this.ready) {
      const done = new Promise((resolve) => {
        this.flushed = resolve;
        setTimeout(resolve, FLUSH_WAIT_MS);
      });
      ws.send(encode({ type: "Flush", id: FLUSH_ID }));
      await done;
    }
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "stopped");
  }

  // the microphone and the audio graph, freed
  release() {
    if (this.node) {
      this.node.port.postMessage("stop");
      this.node.port.onmessage = null;
      this.node.disconnect();
      this.node = null;
    }
    if (this.stream) {
      for (const track of this.stream.getTracks()) track.stop();
      this.stream = null;
    }
    if (this.context) {
      this.context.close().catch(() => {});
      this.context = null;
    }
  }
}

function micError(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new MicError(
      "denied",
      "Microphone access was denied. Allow the microphone for this page in the browser's " +
        "site settings (the icon beside the address), then press Start again.",
    );
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") {
    return new MicError("missing", "No microphone was found. Plug one in, then press Start again.");
  }
  if (name === "NotReadableError" || name === "AbortError") {
    return new MicError(
      "busy",
      "The microphone could not be opened: another application may be using it.",
    );
  }
  return new MicError("other", `The microphone could not be opened: ${err && err.message}`);
}
