// MessagePack for the moshi protocol: the subset its messages use, both ways.
//
// encode(value): null, booleans, integers (as the smallest int/uint format), other numbers as
// float64, strings (UTF-8), Uint8Array as bin, Float32Array as an array of float32 (the audio:
// moshi-server's clients send `pcm` so), arrays, and plain objects as maps with string keys.
// decode(bytes): every format but the ext types; maps become objects without a prototype (a
// key named "__proto__" is then just a key), 64-bit integers beyond 2^53 become BigInt.
// Not a general library: no ext types, no timestamps, no streaming.

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

export class MessagePackError extends Error {}

class Writer {
  constructor(size) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
    this.pos = 0;
  }

  room(n) {
    if (this.pos + n <= this.bytes.length) return;
    let size = this.bytes.length * 2;
    while (size < this.pos + n) size *= 2;
    const bigger = new Uint8Array(size);
    bigger.set(this.bytes.subarray(0, this.pos));
    this.bytes = bigger;
    this.view = new DataView(bigger.buffer);
  }

  byte(b) {
    this.room(1);
    this.bytes[this.pos++] = b;
  }

  // one format byte followed by `size` bytes written by `put` (big-endian, as the format says)
  typed(head, size, put) {
    this.room(1 + size);
    this.bytes[this.pos] = head;
    put(this.view, this.pos + 1);
    this.pos += 1 + size;
  }

  raw(data) {
    this.room(data.length);
    this.bytes.set(data, this.pos);
    this.pos += data.length;
  }

  finish() {
    return this.bytes.slice(0, this.pos);
  }
}

function writeLength(w, n, fix, fixMax, heads) {
  // heads: the 8-, 16- and 32-bit length formats (null where the type has no 8-bit one)
  if (fix !== null && n <= fixMax) w.byte(fix | n);
  else if (heads[0] !== null && n < 0x100) w.typed(heads[0], 1, (v, o) => v.setUint8(o, n));
  else if (n < 0x10000) w.typed(heads[1], 2, (v, o) => v.setUint16(o, n));
  else if (n < 0x100000000) w.typed(heads[2], 4, (v, o) => v.setUint32(o, n));
  else throw new MessagePackError(`too long for MessagePack: ${n}`);
}

function writeInteger(w, n) {
  if (n >= 0) {
    if (n < 0x80) w.byte(n);
    else if (n < 0x100) w.typed(0xcc, 1, (v, o) => v.setUint8(o, n));
    else if (n < 0x10000) w.typed(0xcd, 2, (v, o) => v.setUint16(o, n));
    else if (n < 0x100000000) w.typed(0xce, 4, (v, o) => v.setUint32(o, n));
    else w.typed(0xcf, 8, (v, o) => v.setBigUint64(o, BigInt(n)));
  } else if (n >= -32) w.byte(n & 0xff);
  else if (n >= -0x80) w.typed(0xd0, 1, (v, o) => v.setInt8(o, n));
  else if (n >= -0x8000) w.typed(0xd1, 2, (v, o) => v.setInt16(o, n));
  else if (n >= -0x80000000) w.typed(0xd2, 4, (v, o) => v.setInt32(o, n));
  else w.typed(0xd3, 8, (v, o) => v.setBigInt64(o, BigInt(n)));
}

function write(w, value) {
  if (value === null || value === undefined) w.byte(0xc0);
  else if (value === false) w.byte(0xc2);
  else if (value === true) w.byte(0xc3);
  else if (typeof value === "number") {
    if (Number.isSafeInteger(value)) writeInteger(w, value);
    else w.typed(0xcb, 8, (v, o) => v.setFloat64(o, value));
  } else if (typeof value === "bigint") {
    if (value >= 0n) w.typed(0xcf, 8, (v, o) => v.setBigUint64(o, value));
    else w.typed(0xd3, 8, (v, o) => v.setBigInt64(o, value));
  } else if (typeof value === "string") {
    const data = utf8Encoder.encode(value);
    writeLength(w, data.length, 0xa0, 31, [0xd9, 0xda, 0xdb]);
    w.raw(data);
  } else if (value instanceof Float32Array) {
    writeLength(w, value.length, 0x90, 15, [null, 0xdc, 0xdd]);
    w.room(5 * value.length);
    for (let i = 0; i < value.length; i++) {
      w.bytes[w.pos] = 0xca;
      w.view.setFloat32(w.pos + 1, value[i]);
      w.pos += 5;
    }
  } else if (value instanceof Uint8Array) {
    writeLength(w, value.length, null, 0, [0xc4, 0xc5, 0xc6]);
    w.raw(value);
  } else if (Array.isArray(value)) {
    writeLength(w, value.length, 0x90, 15, [null, 0xdc, 0xdd]);
    for (const item of value) write(w, item);
  } else if (typeof value === "object") {
    const keys = Object.keys(value).filter((k) => value[k] !== undefined);
    writeLength(w, keys.length, 0x80, 15, [null, 0xde, 0xdf]);
    for (const key of keys) {
      write(w, key);
      write(w, value[key]);
    }
  } else {
    throw new MessagePackError(`cannot encode a ${typeof value}`);
  }
}

export function encode(value) {
  const w = new Writer(value instanceof Float32Array ? 5 * value.length + 64 : 256);
  write(w, value);
  return w.finish();
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  need(n) {
    if (this.pos + n > this.bytes.length) throw new MessagePackError("truncated MessagePack");
    const at = this.pos;
    this.pos += n;
    return at;
  }

  u8() { return this.view.getUint8(this.need(1)); }
  u16() { return this.view.getUint16(this.need(2)); }
  u32() { return this.view.getUint32(this.need(4)); }

  big(signed) {
    const at = this.need(8);
    const n = signed ? this.view.getBigInt64(at) : this.view.getBigUint64(at);
    const small = n >= BigInt(Number.MIN_SAFE_INTEGER) && n <= BigInt(Number.MAX_SAFE_INTEGER);
    return small ? Number(n) : n;
  }

  str(n) {
    const at = this.need(n);
    return utf8Decoder.decode(this.bytes.subarray(at, at + n));
  }

  bin(n) {
    const at = this.need(n);
    return this.bytes.slice(at, at + n);
  }

  array(n) {
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.value();
    return out;
  }

  map(n) {
    const out = Object.create(null);
    for (let i = 0; i < n; i++) {
      const key = this.value();
      out[String(key)] = this.value();
    }
    return out;
  }

  value() {
    const b = this.u8();
    if (b < 0x80) return b;
    if (b < 0x90) return this.map(b & 0x0f);
    if (b < 0xa0) return this.array(b & 0x0f);
    if (b < 0xc0) return this.str(b & 0x1f);
    if (b >= 0xe0) return b - 0x100;
    const v = this.view;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.bin(this.u8());
      case 0xc5: return this.bin(this.u16());
      case 0xc6: return this.bin(this.u32());
      case 0xca: return v.getFloat32(this.need(4));
      case 0xcb: return v.getFloat64(this.need(8));
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: return this.big(false);
      case 0xd0: return v.getInt8(this.need(1));
      case 0xd1: return v.getInt16(this.need(2));
      case 0xd2: return v.getInt32(this.need(4));
      case 0xd3: return this.big(true);
      case 0xd9: return this.str(this.u8());
      case 0xda: return this.str(this.u16());
      case 0xdb: return this.str(this.u32());
      case 0xdc: return this.array(this.u16());
      case 0xdd: return this.array(this.u32());
      case 0xde: return this.map(this.u16());
      case 0xdf: return this.map(this.u32());
      default:
        throw new MessagePackError(`unsupported MessagePack format 0x${b.toString(16)}`);
    }
  }
}

export function decode(data) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  const reader = new Reader(bytes);
  const value = reader.value();
  if (reader.pos !== bytes.length) throw new MessagePackError("bytes after the MessagePack value");
  return value;
}
