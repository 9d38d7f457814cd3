// A file's transcription through the server's OpenAI route (POST /v1/audio/transcriptions,
// multipart), with progress: `stream=true`, so the words arrive as server-sent events
// (`transcript.text.delta`, then `transcript.text.done`) while the file is transcribed. Their
// times, which the stream does not carry, come from a second request with
// `response_format=verbose_json` when a download needs them (`timings`): the file is then
// transcribed again, once, and only if asked.
// XMLHttpRequest rather than fetch: it reports the upload's progress.

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function errorText(xhr) {
  // OpenAI's {"error": {"message"}}, or a plain text body
  try {
    const body = JSON.parse(xhr.responseText);
    if (body && body.error) return body.error.message || String(body.error);
  } catch {
    // not JSON
  }
  return (xhr.responseText || xhr.statusText || "").trim();
}

function send(xhr, body, { onUpload, onProgress }) {
  return new Promise((resolve, reject) => {
    xhr.upload.onprogress = (event) => {
      if (onUpload && event.lengthComputable) onUpload(event.loaded / event.total);
    };
    xhr.upload.onload = () => onUpload && onUpload(1);
    xhr.onprogress = () => onProgress && onProgress();
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(xhr);
      else reject(new HttpError(xhr.status, errorText(xhr)));
    };
    xhr.onerror = () => reject(new HttpError(0, "the connection to the server failed"));
    xhr.onabort = () => reject(new HttpError(-1, "cancelled"));
    xhr.send(body);
  });
}

export class FileJob {
  constructor({ file, route, model, key }) {
    this.file = file;
    this.route = route;
    this.model = model;
    this.key = key;
    this.xhr = null;
    this.timed = null; // {words, duration, segments} once known
  }

  headers(xhr) {
    if (this.key) xhr.setRequestHeader("kyutai-api-key", this.key);
  }

  cancel() {
    if (this.xhr) this.xhr.abort();
  }

  // run it: onUpload(fraction), onWord(text); resolves with the text
  async run({ onUpload, onWord }) {
    const form = new FormData();
    form.append("file", this.file, this.file.name || "audio");
    form.append("model", this.model);
    form.append("stream", "true");
    const xhr = new XMLHttpRequest();
    this.xhr = xhr;
    xhr.open("POST", this.route);
    this.headers(xhr);
    let seen = 0; // characters of the response parsed
    let text = null;
    let failure = null;
    const parse = () => {
      const body = xhr.responseText;
      let end;
      while ((end = body.indexOf("\n\n", seen)) !== -1) {
        const block = body.slice(seen, end);
        seen = end + 2;
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const event = JSON.parse(line.slice(5));
          if (event.type === "transcript.text.delta") onWord(event.delta.trim());
          else if (event.type === "transcript.text.done") text = event.text;
          else if (event.type === "error") failure = event.error;
        }
      }
    };
    await send(xhr, form, { onUpload, onProgress: parse });
    parse();
    if (failure) throw new HttpError(500, failure.message || "the transcription failed");
    return text ?? "";
  }

  // the words with their times (a second transcription with OpenAI's route, once)
  async timings(onUpload) {
    if (this.timed) return this.timed;
    const form = new FormData();
    form.append("file", this.file, this.file.name || "audio");
    form.append("model", this.model);
    form.append("response_format", "verbose_json");
    form.append("timestamp_granularities[]", "word");
    form.append("timestamp_granularities[]", "segment");
    const xhr = new XMLHttpRequest();
    this.xhr = xhr;
    xhr.open("POST", this.route);
    this.headers(xhr);
    await send(xhr, form, { onUpload });
    const body = JSON.parse(xhr.responseText);
    const words = (body.words || []).map((w) => ({ text: w.word, start: w.start, end: w.end }));
    this.timed = { words, duration: body.duration || 0, segments: body.segments || null };
    return this.timed;
  }
}
