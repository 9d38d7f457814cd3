// The microphone in the audio thread: mono, resampled to the model's rate (24 kHz), cut into
// frames of the model's size (1920 samples, 80 ms), each posted to the page as it fills.
//
// The resampler is a windowed-sinc low-pass evaluated at each output sample's position in the
// input (any ratio: 48 kHz, 44.1 kHz, 16 kHz microphones...). Its kernel is tabulated at
// PHASES sub-sample positions; the cutoff sits a little below the lower of the two Nyquist
// frequencies so that nothing above 12 kHz folds back into the speech band.

const PHASES = 512; // sub-sample positions of the tabulated kernel
const ZERO_CROSSINGS = 16; // on each side of the kernel's centre, at the cutoff frequency
const ROLLOFF = 0.92; // the cutoff, as a fraction of the lower Nyquist frequency

function blackman(x) {
  // x in [-1, 1]
  const a = Math.PI * (x + 1);
  return 0.42 - 0.5 * Math.cos(a) + 0.08 * Math.cos(2 * a);
}

class Resampler {
  constructor(inputRate, outputRate) {
    this.step = inputRate / outputRate; // input samples per output sample
    const cutoff = 0.5 * ROLLOFF * Math.min(1, outputRate / inputRate); // cycles per input sample
    this.half = Math.ceil(ZERO_CROSSINGS / (2 * cutoff)); // kernel half-width, input samples
    this.taps = 2 * this.half;
    this.table = new Float32Array((PHASES + 1) * this.taps);
    for (let phase = 0; phase <= PHASES; phase++) {
      const frac = phase / PHASES;
      let sum = 0;
      for (let k = 0; k < this.taps; k++) {
        // tap k reads input sample (base - half + 1 + k); t: its distance from the position
        const t = frac + this.half - 1 - k;
        const x = 2 * cutoff * t;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const value = Math.abs(t) < this.half ? 2 * cutoff * sinc * blackman(t / this.half) : 0;
        this.table[phase * this.taps + k] = value;
        sum += value;
      }
      for (let k = 0; k < this.taps; k++) this.table[phase * this.taps + k] /= sum; // unit gain
    }
    // input history; sample i of the stream is at history[i - this.first]; the stream starts
    // with `half` zeros before its first sample so the first outputs have their past
    this.history = new Float32Array(8192);
    this.first = -this.half;
    this.length = this.half; // samples held (the zeros, then what came)
    this.produced = 0; // output samples so far
  }

  // push input samples; call emit(sample) for every output sample they complete
  push(input, emit) {
    if (this.length + input.length > this.history.length) this.compact(input.length);
    this.history.set(input, this.length);
    this.length += input.length;
    const end = this.first + this.length; // one past the last input sample held
    const { table, taps, half, history } = this;
    for (;;) {
      const position = this.produced * this.step;
      let base = Math.floor(position);
      let phase = Math.round((position - base) * PHASES);
      if (phase === PHASES) {
        base += 1;
        phase = 0;
      }
      if (base + half >= end) break; // its last tap is not here yet
      const offset = base - half + 1 - this.first;
      const row = phase * taps;
      let acc = 0;
      for (let k = 0; k < taps; k++) acc += history[offset + k] * table[row + k];
      emit(acc);
      this.produced += 1;
    }
  }

  // drop the samples no future output reads, making room for `incoming` more
  compact(incoming) {
    const keepFrom = Math.floor(this.produced * this.step) - this.half;
    const drop = Math.max(0, Math.min(keepFrom - this.first, this.length));
    this.history.copyWithin(0, drop, this.length);
    this.length -= drop;
    this.first += drop;
    if (this.length + incoming > this.history.length) {
      const bigger = new Float32Array(2 * (this.length + incoming));
      bigger.set(this.history.subarray(0, this.length));
      this.history = bigger;
    }
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 24000, frameSize = 1920 } = options.processorOptions || {};
    this.resampler = new Resampler(sampleRate, targetRate);
    this.frameSize = frameSize;
    this.frame = new Float32Array(frameSize);
    this.filled = 0;
    this.mono = new Float32Array(128);
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "stop") this.running = false;
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length > 0) {
      const n = channels[0].length;
      if (this.mono.length !== n) this.mono = new Float32Array(n);
      const mono = this.mono;
      mono.set(channels[0]);
      for (let c = 1; c < channels.length; c++) {
        const ch = channels[c];
        for (let i = 0; i < n; i++) mono[i] += ch[i];
      }
      if (channels.length > 1) for (let i = 0; i < n; i++) mono[i] /= channels.length;
      this.resampler.push(mono, (sample) => {
        this.frame[this.filled++] = sample;
        if (this.filled === this.frameSize) {
          this.port.postMessage(this.frame, [this.frame.buffer]);
          this.frame = new Float32Array(this.frameSize);
          this.filled = 0;
        }
      });
    }
    return this.running;
  }
}

registerProcessor("dsm-capture", CaptureProcessor);
