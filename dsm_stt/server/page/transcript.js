// The transcript on the page: words with their times, grouped into turns (paragraphs), and
// its view. A turn is open while its speaker talks (shown as live) and closed at an end of turn.
//
// Words arrive the model's delay after their audio, so the last words of a turn often come
// after the end of turn was decided: a word that started before the end of the last closed
// turn joins that turn (the rule of dsm_stt/engine/turns.py) instead of opening a new one.

export class Transcript {
  constructor(source, name) {
    this.source = source; // "mic" or "file"
    this.name = name; // the file's name, or "microphone"
    this.turns = []; // {words: [{text, start, end}], closed: bool, end: seconds|null}
    this.duration = 0; // seconds of audio heard
    this.timed = true; // the words carry times (a streamed file's do not)
    this.listeners = new Set();
  }

  onChange(listener) {
    this.listeners.add(listener);
  }

  changed(what, detail) {
    for (const listener of this.listeners) listener(what, detail);
  }

  get words() {
    return this.turns.flatMap((turn) => turn.words);
  }

  get openTurn() {
    const last = this.turns[this.turns.length - 1];
    return last && !last.closed ? last : null;
  }

  // a word as the model gave it; returns it (null for an empty one)
  addWord(text, start) {
    const clean = text.trim();
    if (!clean) return null;
    const word = { text: clean, start: Math.max(0, start), end: null };
    const last = this.turns[this.turns.length - 1];
    let turn = this.openTurn;
    if (!turn && last && last.end !== null && word.start < last.end) turn = last; // a late word
    if (!turn) {
      turn = { words: [], closed: false, end: null };
      this.turns.push(turn);
    }
    turn.words.push(word);
    this.changed("word", { word, turn });
    return word;
  }

  // the end of the last word (EndWord)
  endWord(stop) {
    const last = this.words[this.words.length - 1];
    if (last && last.end === null) last.end = Math.max(stop, last.start);
  }

  // the open turn ends at `time` (seconds of audio); false if there was none to end
  closeTurn(time) {
    const turn = this.openTurn;
    if (!turn || turn.words.length === 0) return false;
    turn.closed = true;
    turn.end = time;
    this.changed("close", { turn });
    return true;
  }

  // the end of a session: whatever is open is closed
  finish(time) {
    this.closeTurn(time ?? this.duration);
  }

  // words given all at once (a file's), times in seconds; `segments` ({start, end}, in order),
  // when given, are the turns: each word goes to the last segment starting at or before it
  setWords(words, duration, segments) {
    const cuts = segments && segments.length ? segments : [{ start: 0, end: duration }];
    this.turns = cuts.map((s) => ({ words: [], closed: true, end: s.end }));
    let i = 0;
    for (const w of words) {
      while (i + 1 < cuts.length && w.start >= cuts[i + 1].start) i += 1;
      this.turns[i].words.push({ text: w.text, start: w.start, end: w.end });
    }
    this.turns = this.turns.filter((turn) => turn.words.length);
    this.duration = duration;
    this.timed = true;
    this.changed("reset", {});
  }

  text() {
    return this.turns
      .map((turn) => turn.words.map((w) => w.text).join(" "))
      .filter((t) => t)
      .join("\n\n");
  }

  // the body of POST /page/render
  forRender(model) {
    return { words: this.words, duration: this.duration, model };
  }
}

// Renders a Transcript into an element: one <p class="turn"> per turn, one <span class="word">
// per word; the open turn has the class "live".
export class TranscriptView {
  constructor(element) {
    this.element = element;
    this.transcript = null;
    this.paragraphs = new Map(); // turn → <p>
  }

  show(transcript) {
    this.transcript = transcript;
    transcript.onChange((what, detail) => this.update(what, detail));
    this.redraw();
  }

  redraw() {
    this.element.replaceChildren();
    this.paragraphs.clear();
    if (!this.transcript) return;
    for (const turn of this.transcript.turns) {
      const p = this.paragraph(turn);
      for (const word of turn.words) this.append(p, this.span(word));
    }
    this.element.classList.toggle("empty", this.transcript.words.length === 0);
  }

  paragraph(turn) {
    const p = document.createElement("p");
    p.className = turn.closed ? "turn" : "turn live";
    this.paragraphs.set(turn, p);
    this.element.append(p);
    return p;
  }

  span(word) {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = word.text;
    if (word.start !== null && this.transcript.timed) span.title = `${word.start.toFixed(2)} s`;
    return span;
  }

  // a real space between words, so that selected text copies as words
  append(p, span) {
    if (p.childElementCount) p.append(" ");
    p.append(span);
  }

  update(what, detail) {
    if (what === "reset") return this.redraw();
    this.element.classList.remove("empty");
    const turn = detail.turn;
    const p = this.paragraphs.get(turn) || this.paragraph(turn);
    if (what === "word") {
      const span = this.span(detail.word);
      span.classList.add("new");
      this.append(p, span);
      if (!turn.closed) this.follow();
    } else if (what === "close") {
      p.classList.remove("live");
    }
    return undefined;
  }

  follow() {
    // keep the newest words in sight unless the reader scrolled up
    const el = this.element;
    if (el.scrollHeight - el.scrollTop - el.clientHeight < 80) el.scrollTop = el.scrollHeight;
  }
}
