// Sluice rule SDK for AssemblyScript: ABI v1 (see rules/ABI.md).
//
// A rule's entry file re-exports the two exports every module needs and
// defines its own `sluice_on_batch` (and, if it takes a config, `sluice_init`):
//
//   import { Message, emitPoint } from "@sluice/rule-sdk";
//   export { sluice_abi_version, sluice_alloc } from "@sluice/rule-sdk";
//
//   export function sluice_on_batch(batch: usize, count: i32): i32 {
//     for (let i = 0; i < count; i++) {
//       const m = Message.at(batch, i);
//       ...
//     }
//     return 0;
//   }
//
// Compile with `--runtime minimal --use abort=sluiceAbort --use trace=sluiceTrace`
// (the SDK's asconfig.json has them; README.md explains why).

// ---------------------------------------------------------------------------
// Host functions (module `sluice`). Lengths are in bytes, text is UTF-8; each
// returns a Status. The wrappers further down take AssemblyScript values.

export namespace host {
  // @ts-ignore: decorator
  @external("sluice", "emit_point")
  export declare function emit_point(msg: i32, metricPtr: usize, metricLen: usize, value: f64, timeMs: i64): i32;
  // @ts-ignore: decorator
  @external("sluice", "emit_event")
  export declare function emit_event(msg: i32, jsonPtr: usize, jsonLen: usize, timeMs: i64): i32;
  // @ts-ignore: decorator
  @external("sluice", "publish")
  export declare function publish(msg: i32, topicPtr: usize, topicLen: usize, payloadPtr: usize, payloadLen: usize, qos: i32, retain: i32): i32;
  // @ts-ignore: decorator
  @external("sluice", "drop_message")
  export declare function drop_message(msg: i32): i32;
  // @ts-ignore: decorator
  @external("sluice", "fail")
  export declare function fail(msg: i32, reasonPtr: usize, reasonLen: usize): i32;
  // @ts-ignore: decorator
  @external("sluice", "log")
  export declare function log(level: i32, textPtr: usize, textLen: usize): i32;
  // @ts-ignore: decorator
  @external("sluice", "state_get")
  export declare function state_get(msg: i32, keyPtr: usize, keyLen: usize, bufPtr: usize, bufCap: usize): i32;
  // @ts-ignore: decorator
  @external("sluice", "state_set")
  export declare function state_set(msg: i32, keyPtr: usize, keyLen: usize, valuePtr: usize, valueLen: usize): i32;
  // @ts-ignore: decorator
  @external("sluice", "state_delete")
  export declare function state_delete(msg: i32, keyPtr: usize, keyLen: usize): i32;
}

export const ABI_VERSION: i32 = 1;

/** A time argument meaning "the message's arrival time". */
export const TIME_OF_MESSAGE: i64 = i64.MIN_VALUE;

/** Host function results. */
export enum Status {
  OK = 0,
  /** `msg` is not an index of the current batch */
  BAD_MESSAGE = -1,
  /** pointer/length outside memory, or text that is not UTF-8 */
  BAD_MEMORY = -2,
  /** the message reached `max_outputs_per_message`, or the state limit */
  LIMIT = -3,
  /** invalid argument: event not JSON, NaN, wildcard topic, empty key... */
  INVALID = -4,
  /** points and state need a device; this message has none */
  NO_DEVICE = -5,
  /** state_get: the key has no value */
  NOT_FOUND = -6,
}

export enum LogLevel {
  ERROR = 0,
  WARN = 1,
  INFO = 2,
  DEBUG = 3,
  TRACE = 4,
}

// ---------------------------------------------------------------------------
// Exports every rule re-exports.

export function sluice_abi_version(): i32 {
  return ABI_VERSION;
}

// The batch buffer lives outside the GC heap (plain TLSF blocks), so the
// collector never sees or moves it; it is only replaced when a bigger batch
// arrives, because the host never holds two buffers at once.
let hostBuffer: usize = 0;
let hostCapacity: usize = 0;

export function sluice_alloc(size: i32): usize {
  if (ASC_RUNTIME == 0) {
    // @ts-ignore: compile-time error
    ERROR("the stub runtime never frees: a Sluice rule would grow with every batch; use --runtime minimal");
  }
  // The host calls this before every batch and before sluice_init, never
  // while guest code runs: the stack then holds no object, so the minimal
  // runtime's collector (which only scans globals) may free everything the
  // previous batch left behind. This is what keeps a rule's memory flat.
  __collect();
  if (size < 0 || <usize>size > (1 << 30) - 64) return 0; // over TLSF's largest block: refuse, do not trap
  if (<usize>size > hostCapacity || hostBuffer == 0) {
    if (hostBuffer != 0) heap.free(hostBuffer);
    hostCapacity = max<usize>(<usize>size, 4096);
    hostBuffer = heap.alloc(hostCapacity);
  }
  return hostBuffer;
}

// ---------------------------------------------------------------------------
// Messages.

/** Size of one message descriptor in a batch. */
export const DESCRIPTOR_SIZE: usize = 40;

/**
 * One message of the current batch: a view over its 40-byte descriptor.
 * The bytes it points to belong to the host's batch buffer and are only valid
 * during the `sluice_on_batch` call that received them.
 */
@final
export class Message {
  /** The message's index in the batch: the `msg` of every host call about it. */
  readonly index: i32;
  /** Address of the descriptor. */
  readonly descriptor: usize;

  constructor(index: i32, descriptor: usize) {
    this.index = index;
    this.descriptor = descriptor;
  }

  /** Message `index` of the batch at `batch` (the arguments of sluice_on_batch). */
  static at(batch: usize, index: i32): Message {
    return new Message(index, batch + <usize>index * DESCRIPTOR_SIZE);
  }

  get topicPtr(): usize { return <usize>load<u32>(this.descriptor, 0); }
  get topicLen(): usize { return <usize>load<u32>(this.descriptor, 4); }
  get payloadPtr(): usize { return <usize>load<u32>(this.descriptor, 8); }
  get payloadLen(): usize { return <usize>load<u32>(this.descriptor, 12); }
  get devicePtr(): usize { return <usize>load<u32>(this.descriptor, 16); }
  get deviceLen(): usize { return <usize>load<u32>(this.descriptor, 20); }
  /** Arrival time, Unix epoch milliseconds. */
  get receivedAtMs(): i64 { return load<i64>(this.descriptor, 24); }
  get qos(): u8 { return load<u8>(this.descriptor, 32); }
  get retain(): bool { return load<u8>(this.descriptor, 33) != 0; }
  /** How many rule publishes led to this message. */
  get hops(): u8 { return load<u8>(this.descriptor, 34); }

  get hasDevice(): bool { return this.deviceLen != 0; }
  /** The device id ("" when the message has none). */
  get deviceId(): string { return String.UTF8.decodeUnsafe(this.devicePtr, this.deviceLen); }
  get topic(): string { return String.UTF8.decodeUnsafe(this.topicPtr, this.topicLen); }
  /** The payload decoded as UTF-8 (invalid sequences become U+FFFD). */
  get payloadText(): string { return String.UTF8.decodeUnsafe(this.payloadPtr, this.payloadLen); }
  /** A copy of the payload bytes. */
  payloadBytes(): Uint8Array {
    const out = new Uint8Array(<i32>this.payloadLen);
    memory.copy(out.dataStart, this.payloadPtr, this.payloadLen);
    return out;
  }
  /** The payload's top-level fields, or null when it is not exactly one JSON object. */
  jsonFields(): JsonFields | null {
    return JsonFields.parse(this.payloadPtr, this.payloadLen);
  }
}

// ---------------------------------------------------------------------------
// Wrappers. Text arguments are encoded into one reusable scratch buffer
// rather than a fresh ArrayBuffer per call, so reporting outputs allocates
// nothing. Each wrapper returns the host's Status.

let scratch: usize = 0;
let scratchCapacity: usize = 0;

function reserveScratch(size: usize): usize {
  if (size > scratchCapacity) {
    if (scratch != 0) heap.free(scratch);
    scratchCapacity = max<usize>(size, 256);
    scratch = heap.alloc(scratchCapacity);
  }
  return scratch;
}

// @ts-ignore: decorator
@inline
function utf8Length(s: string): usize {
  return <usize>String.UTF8.byteLength(s);
}

// Lone surrogates become U+FFFD: the host refuses text that is not UTF-8.
function encodeInto(s: string, at: usize): usize {
  return String.UTF8.encodeUnsafe(changetype<usize>(s), s.length, at, false, String.UTF8.ErrorMode.REPLACE);
}

// Where the bytes of a byte-like argument are, for the host call that follows
// (set by bytesOf; strings are encoded into the scratch buffer at `at`).
let argPtr: usize = 0;
let argLen: usize = 0;

function bytesLengthIfText<T>(value: T): usize {
  if (isString<T>()) return utf8Length(changetype<string>(value));
  return 0;
}

function bytesOf<T>(value: T, at: usize): void {
  if (isString<T>()) {
    argPtr = scratch + at;
    argLen = encodeInto(changetype<string>(value), argPtr);
  } else if (isReference<T>() && idof<T>() == idof<ArrayBuffer>()) {
    argPtr = changetype<usize>(value);
    argLen = <usize>changetype<ArrayBuffer>(value).byteLength;
  } else if (isReference<T>() && idof<T>() == idof<Uint8Array>()) {
    argPtr = changetype<Uint8Array>(value).dataStart;
    argLen = <usize>changetype<Uint8Array>(value).byteLength;
  } else if (isReference<T>() && idof<T>() == idof<JsonWriter>()) {
    argPtr = changetype<JsonWriter>(value).ptr;
    argLen = changetype<JsonWriter>(value).length;
  } else {
    // @ts-ignore: compile-time error
    ERROR("expected a string, ArrayBuffer, Uint8Array or JsonWriter");
  }
}

/** A point (device of `msg`, metric, time, value). NaN and infinities are INVALID. */
export function emitPoint(msg: i32, metric: string, value: f64, timeMs: i64 = TIME_OF_MESSAGE): i32 {
  const buf = reserveScratch(utf8Length(metric));
  return host.emit_point(msg, buf, encodeInto(metric, buf), value, timeMs);
}

/** An event: `json` (string, JsonWriter, ArrayBuffer or Uint8Array) must be a JSON document. */
export function emitEvent<T>(msg: i32, json: T, timeMs: i64 = TIME_OF_MESSAGE): i32 {
  reserveScratch(bytesLengthIfText<T>(json));
  bytesOf<T>(json, 0);
  return host.emit_event(msg, argPtr, argLen, timeMs);
}

/** An MQTT message back through the broker; `payload` is a string, JsonWriter, ArrayBuffer or Uint8Array. */
export function publish<T>(msg: i32, topic: string, payload: T, qos: i32 = 0, retain: bool = false): i32 {
  const topicLen = utf8Length(topic);
  const buf = reserveScratch(topicLen + bytesLengthIfText<T>(payload));
  encodeInto(topic, buf);
  bytesOf<T>(payload, topicLen);
  return host.publish(msg, buf, topicLen, argPtr, argLen, qos, retain ? 1 : 0);
}

/** Drops the message on purpose: outputs it emitted in this call are discarded. */
export function dropMessage(msg: i32): i32 {
  return host.drop_message(msg);
}

/** Sends the message to the dead letters with `reason`; its other outputs are discarded. */
export function fail(msg: i32, reason: string): i32 {
  const buf = reserveScratch(utf8Length(reason));
  return host.fail(msg, buf, encodeInto(reason, buf));
}

/** A line in Sluice's log (up to 1 KiB; rate limited by the host). */
export function log(level: LogLevel, text: string): i32 {
  const buf = reserveScratch(utf8Length(text));
  return host.log(level, buf, encodeInto(text, buf));
}

// ---------------------------------------------------------------------------
// Per-device state, scoped to (this rule, device of `msg`). Keys are 1..=256
// bytes of UTF-8. Changes are seen by later messages of the same batch and
// kept only if the batch call succeeds.

/**
 * The value stored under `key`, or null when there is none. Errors (NO_DEVICE,
 * INVALID key...) also give null; use stateRead to tell them apart.
 */
export function stateGet(msg: i32, key: string): Uint8Array | null {
  const keyLen = utf8Length(key);
  // Most values fit behind the key in the scratch buffer: one host call, one copy.
  const buf = reserveScratch(keyLen + 256);
  encodeInto(key, buf);
  const room = scratchCapacity - keyLen;
  const n = host.state_get(msg, buf, keyLen, buf + keyLen, room);
  if (n < 0) return null;
  const out = new Uint8Array(n);
  if (<usize>n <= room) {
    memory.copy(out.dataStart, buf + keyLen, <usize>n);
  } else if (host.state_get(msg, buf, keyLen, out.dataStart, <usize>n) != n) {
    return null;
  }
  return out;
}

/**
 * Reads the value under `key` into `into` without allocating. Returns the
 * value's length (copied only if it is <= into.length; otherwise call again
 * with a bigger array), or a negative Status (NOT_FOUND when there is none).
 */
export function stateRead(msg: i32, key: string, into: Uint8Array): i32 {
  const buf = reserveScratch(utf8Length(key));
  return host.state_get(msg, buf, encodeInto(key, buf), into.dataStart, <usize>into.byteLength);
}

/** Stores `value` (Uint8Array, ArrayBuffer or string) under `key`. LIMIT when the state limit would be exceeded. */
export function stateSet<T>(msg: i32, key: string, value: T): i32 {
  const keyLen = utf8Length(key);
  const buf = reserveScratch(keyLen + bytesLengthIfText<T>(value));
  encodeInto(key, buf);
  bytesOf<T>(value, keyLen);
  return host.state_set(msg, buf, keyLen, argPtr, argLen);
}

/** Removes `key` (OK also when it had no value). */
export function stateDelete(msg: i32, key: string): i32 {
  const buf = reserveScratch(utf8Length(key));
  return host.state_delete(msg, buf, encodeInto(key, buf));
}

// ---------------------------------------------------------------------------
// Flat JSON objects.

export enum JsonType {
  NULL,
  BOOLEAN,
  NUMBER,
  STRING,
  OBJECT,
  ARRAY,
}

const CONTAINER_OBJECT: u8 = 0;
const CONTAINER_ARRAY: u8 = 1;
// Open containers while skipping a nested value; a global so that skipping
// nests as deep as the input does without recursion or per-call allocation.
const nesting = new Array<u8>();

// Exact powers of ten: a decimal with at most 15 digits and |exponent| <= 22
// converts with a single correctly rounded multiplication or division.
const POW10: StaticArray<f64> = [
  1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

function scale10(m: u64, e: i32): f64 {
  let v = <f64>m;
  if (m == 0) return 0;
  if (m < (<u64>1 << 53)) {
    if (e >= 0 && e <= 22) return v * unchecked(POW10[e]);
    if (e < 0 && e >= -22) return v / unchecked(POW10[-e]);
  }
  // Rarer inputs: a few roundings, still far inside 1e-9 relative.
  while (e > 22) {
    v *= 1e22;
    e -= 22;
    if (v == Infinity) return v;
  }
  while (e < -22) {
    v /= 1e22;
    e += 22;
    if (v == 0) return v;
  }
  return e >= 0 ? v * unchecked(POW10[e]) : v / unchecked(POW10[-e]);
}

// @ts-ignore: decorator
@inline
function isDigit(c: u32): bool {
  return c - 0x30 < 10;
}

function hexValue(c: u32): i32 {
  if (c - 0x30 < 10) return <i32>(c - 0x30);
  c |= 0x20;
  if (c - 0x61 < 6) return <i32>(c - 0x61 + 10);
  return -1;
}

// Length of the valid UTF-8 sequence starting at p (lead byte >= 0x80), or 0.
function utf8SequenceLength(p: usize, end: usize): usize {
  const b0 = <u32>load<u8>(p);
  let n: usize, lo: u32 = 0x80, hi: u32 = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) n = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    else if (b0 == 0xED) hi = 0x9F; // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    else if (b0 == 0xF4) hi = 0x8F; // nothing above U+10FFFF
  } else return 0;
  if (end - p < n) return 0;
  const b1 = <u32>load<u8>(p, 1);
  if (b1 < lo || b1 > hi) return 0;
  for (let i: usize = 2; i < n; i++) {
    if ((<u32>load<u8>(p + i) & 0xC0) != 0x80) return 0;
  }
  return n;
}

/**
 * Reads the top-level fields of one JSON object, in order, without copying:
 * nested objects and arrays are skipped (validated, not decoded), keys and
 * strings are decoded only when asked for. `parse` checks the whole input
 * first (strict JSON: one object, nothing but whitespace after it, UTF-8
 * strings), so a null result is "not a JSON object" and iteration never
 * meets a syntax error.
 *
 *   const f = JsonFields.parse(ptr, len);
 *   if (f == null) ...;
 *   while (f.next()) if (f.isNumber && f.keyIs("temperature")) t = f.number;
 */
export class JsonFields {
  private start: usize;
  private end: usize;
  private p: usize;
  private state: i32 = 0; // 0 before '{', 1 inside, 2 after '}', 3 syntax error
  private keyStart: usize = 0;
  private keyEnd: usize = 0;
  private keyEscaped: bool = false;
  private valueStart: usize = 0;
  private valueEnd: usize = 0;
  private valueEscaped: bool = false;
  private valueType: JsonType = JsonType.NULL;
  private numberValue: f64 = NaN;

  private constructor(ptr: usize, len: usize) {
    this.start = ptr;
    this.end = ptr + len;
    this.p = ptr;
  }

  /** The fields of the object in [ptr, ptr + len), or null when those bytes are not exactly one JSON object. */
  static parse(ptr: usize, len: usize): JsonFields | null {
    const f = new JsonFields(ptr, len);
    while (f.next()) {}
    if (f.state != 2) return null;
    f.p = ptr;
    f.state = 0;
    return f;
  }

  /** As parse, over the bytes of an array. */
  static parseBytes(bytes: Uint8Array): JsonFields | null {
    return JsonFields.parse(bytes.dataStart, <usize>bytes.byteLength);
  }

  /** Moves to the next top-level field; false after the last one. */
  next(): bool {
    if (this.state == 0) {
      this.skipSpace();
      if (!this.eat(0x7B)) return this.error(); // {
      this.state = 1;
      this.skipSpace();
      if (this.eat(0x7D)) return this.finish(); // }
    } else if (this.state == 1) {
      this.skipSpace();
      if (this.eat(0x7D)) return this.finish();
      if (!this.eat(0x2C)) return this.error(); // ,
      this.skipSpace();
    } else {
      return false;
    }
    // "key" : value
    if (this.peek() != 0x22) return this.error();
    this.keyStart = this.p + 1;
    if (!this.skipString()) return this.error();
    this.keyEnd = this.p - 1;
    this.keyEscaped = this.valueEscaped;
    this.skipSpace();
    if (!this.eat(0x3A)) return this.error(); // :
    this.skipSpace();
    const c = this.peek();
    this.valueStart = this.p;
    this.numberValue = NaN;
    if (c == 0x22) {
      this.valueType = JsonType.STRING;
      if (!this.skipString()) return this.error();
    } else if (c == 0x2D || isDigit(c)) {
      this.valueType = JsonType.NUMBER;
      if (!this.readNumber()) return this.error();
    } else if (c == 0x7B || c == 0x5B) {
      this.valueType = c == 0x7B ? JsonType.OBJECT : JsonType.ARRAY;
      if (!this.skipNested()) return this.error();
    } else if (this.eatWord("true") || this.eatWord("false")) {
      this.valueType = JsonType.BOOLEAN;
    } else if (this.eatWord("null")) {
      this.valueType = JsonType.NULL;
    } else {
      return this.error();
    }
    this.valueEnd = this.p;
    return true;
  }

  get type(): JsonType { return this.valueType; }
  get isNumber(): bool { return this.valueType == JsonType.NUMBER; }
  get isString(): bool { return this.valueType == JsonType.STRING; }
  /** The value of a NUMBER field (NaN for other types). */
  get number(): f64 { return this.valueType == JsonType.NUMBER ? this.numberValue : NaN; }
  /** True only for a `true` value. */
  get isTrue(): bool { return this.valueType == JsonType.BOOLEAN && load<u8>(this.valueStart) == 0x74; }

  /** The field's key, unescaped. */
  key(): string { return unescape(this.keyStart, this.keyEnd, this.keyEscaped); }

  /** Whether the key equals `name`, without allocating in the common case of a key with no escapes. */
  keyIs(name: string): bool {
    if (this.keyEscaped) return this.key() == name;
    const n = utf8Length(name);
    if (n != this.keyEnd - this.keyStart) return false;
    const buf = reserveScratch(n);
    encodeInto(name, buf);
    return memory.compare(buf, this.keyStart, n) == 0;
  }

  /** A STRING field's text, unescaped ("" for other types). */
  text(): string {
    if (this.valueType != JsonType.STRING) return "";
    return unescape(this.valueStart + 1, this.valueEnd - 1, this.valueEscaped);
  }

  /** The value's JSON text as it appears in the input (any type). */
  get rawPtr(): usize { return this.valueStart; }
  get rawLen(): usize { return this.valueEnd - this.valueStart; }

  private finish(): bool {
    this.skipSpace();
    this.state = this.p == this.end ? 2 : 3;
    return false;
  }

  private error(): bool {
    this.state = 3;
    return false;
  }

  private peek(): u32 {
    return this.p < this.end ? <u32>load<u8>(this.p) : 0;
  }

  private eat(c: u32): bool {
    if (this.peek() != c) return false;
    this.p++;
    return true;
  }

  private eatWord(w: string): bool {
    const n = <usize>w.length;
    if (this.end - this.p < n) return false;
    for (let i: usize = 0; i < n; i++) {
      if (<u32>load<u8>(this.p + i) != <u32>w.charCodeAt(<i32>i)) return false;
    }
    this.p += n;
    return true;
  }

  private skipSpace(): void {
    while (this.p < this.end) {
      const c = load<u8>(this.p);
      if (c != 0x20 && c != 0x0A && c != 0x0D && c != 0x09) break;
      this.p++;
    }
  }

  // At an opening quote: moves past the closing one; sets valueEscaped.
  private skipString(): bool {
    let p = this.p + 1;
    const end = this.end;
    let escaped = false;
    while (p < end) {
      const c = <u32>load<u8>(p);
      if (c == 0x22) {
        this.p = p + 1;
        this.valueEscaped = escaped;
        return true;
      }
      if (c < 0x20) return false;
      if (c == 0x5C) {
        escaped = true;
        if (end - p < 2) return false;
        const e = <u32>load<u8>(p, 1);
        if (e == 0x75) { // \uXXXX
          if (end - p < 6) return false;
          for (let i: usize = 2; i < 6; i++) {
            if (hexValue(<u32>load<u8>(p + i)) < 0) return false;
          }
          p += 6;
        } else if (e == 0x22 || e == 0x5C || e == 0x2F || e == 0x62 || e == 0x66 || e == 0x6E || e == 0x72 || e == 0x74) {
          p += 2;
        } else {
          return false;
        }
      } else if (c < 0x80) {
        p++;
      } else {
        const n = utf8SequenceLength(p, end);
        if (n == 0) return false;
        p += n;
      }
    }
    return false;
  }

  // -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?  into numberValue.
  private readNumber(): bool {
    let p = this.p;
    const end = this.end;
    const negative = load<u8>(p) == 0x2D;
    if (negative) p++;
    let mantissa: u64 = 0;
    let digits = 0; // significant digits kept in mantissa (at most 19)
    let exponent: i32 = 0;
    if (p >= end || !isDigit(load<u8>(p))) return false;
    if (load<u8>(p) == 0x30) {
      p++;
    } else {
      while (p < end && isDigit(load<u8>(p))) {
        if (digits < 19) {
          mantissa = mantissa * 10 + <u64>(load<u8>(p) - 0x30);
          if (mantissa != 0) digits++;
        } else {
          exponent++;
        }
        p++;
      }
    }
    if (p < end && load<u8>(p) == 0x2E) {
      p++;
      if (p >= end || !isDigit(load<u8>(p))) return false;
      while (p < end && isDigit(load<u8>(p))) {
        if (digits < 19) {
          mantissa = mantissa * 10 + <u64>(load<u8>(p) - 0x30);
          if (mantissa != 0) digits++;
          exponent--;
        }
        p++;
      }
    }
    if (p < end && (load<u8>(p) | 0x20) == 0x65) { // e E
      p++;
      let expNegative = false;
      if (p < end && (load<u8>(p) == 0x2B || load<u8>(p) == 0x2D)) {
        expNegative = load<u8>(p) == 0x2D;
        p++;
      }
      if (p >= end || !isDigit(load<u8>(p))) return false;
      let e: i32 = 0;
      while (p < end && isDigit(load<u8>(p))) {
        if (e < 100000) e = e * 10 + <i32>(load<u8>(p) - 0x30);
        p++;
      }
      exponent += expNegative ? -e : e;
    }
    const v = scale10(mantissa, exponent);
    this.numberValue = negative ? -v : v;
    this.p = p;
    return true;
  }

  // At '{' or '[': moves past the matching close, checking the syntax inside.
  private skipNested(): bool {
    nesting.length = 0;
    while (true) {
      // A value is expected here.
      this.skipSpace();
      const c = this.peek();
      let opened = false;
      if (c == 0x7B) {
        this.p++;
        this.skipSpace();
        if (!this.eat(0x7D)) {
          nesting.push(CONTAINER_OBJECT);
          if (!this.skipMemberKey()) return false;
          opened = true;
        }
      } else if (c == 0x5B) {
        this.p++;
        this.skipSpace();
        if (!this.eat(0x5D)) {
          nesting.push(CONTAINER_ARRAY);
          opened = true;
        }
      } else if (c == 0x22) {
        if (!this.skipString()) return false;
      } else if (c == 0x2D || isDigit(c)) {
        if (!this.readNumber()) return false;
      } else if (!(this.eatWord("true") || this.eatWord("false") || this.eatWord("null"))) {
        return false;
      }
      if (opened) continue;
      // After a value: a comma leads to the next one, a bracket closes.
      while (true) {
        if (nesting.length == 0) return true;
        this.skipSpace();
        const top = unchecked(nesting[nesting.length - 1]);
        if (this.eat(0x2C)) {
          if (top == CONTAINER_OBJECT) {
            this.skipSpace();
            if (!this.skipMemberKey()) return false;
          }
          break;
        }
        if (this.eat(top == CONTAINER_OBJECT ? 0x7D : 0x5D)) {
          nesting.pop();
          continue;
        }
        return false;
      }
    }
  }

  // "key" : (inside a nested object)
  private skipMemberKey(): bool {
    if (this.peek() != 0x22 || !this.skipString()) return false;
    this.skipSpace();
    return this.eat(0x3A);
  }
}

// The text of a JSON string body [start, end); escapes are decoded through
// the scratch buffer (never longer than the escaped form).
function unescape(start: usize, end: usize, escaped: bool): string {
  if (!escaped) return String.UTF8.decodeUnsafe(start, end - start);
  const out = reserveScratch(end - start);
  let o = out;
  let p = start;
  while (p < end) {
    const c = <u32>load<u8>(p);
    if (c != 0x5C) {
      store<u8>(o++, <u8>c);
      p++;
      continue;
    }
    const e = <u32>load<u8>(p, 1);
    p += 2;
    if (e == 0x75) {
      let cp = readHex4(p);
      p += 4;
      if (cp >= 0xD800 && cp <= 0xDBFF && end - p >= 6 && load<u8>(p) == 0x5C && load<u8>(p, 1) == 0x75) {
        const lo = readHex4(p + 2);
        if (lo >= 0xDC00 && lo <= 0xDFFF) {
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          p += 6;
        }
      }
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; // a lone surrogate
      o = putCodePoint(o, cp);
    } else {
      let b: u32 = e; // \" \\ \/
      if (e == 0x62) b = 0x08;
      else if (e == 0x66) b = 0x0C;
      else if (e == 0x6E) b = 0x0A;
      else if (e == 0x72) b = 0x0D;
      else if (e == 0x74) b = 0x09;
      store<u8>(o++, <u8>b);
    }
  }
  return String.UTF8.decodeUnsafe(out, o - out);
}

function readHex4(p: usize): u32 {
  let v: u32 = 0;
  for (let i: usize = 0; i < 4; i++) v = (v << 4) | <u32>hexValue(<u32>load<u8>(p + i));
  return v;
}

function putCodePoint(o: usize, cp: u32): usize {
  if (cp < 0x80) {
    store<u8>(o, <u8>cp);
    return o + 1;
  }
  if (cp < 0x800) {
    store<u8>(o, <u8>(0xC0 | (cp >> 6)));
    store<u8>(o, <u8>(0x80 | (cp & 0x3F)), 1);
    return o + 2;
  }
  if (cp < 0x10000) {
    store<u8>(o, <u8>(0xE0 | (cp >> 12)));
    store<u8>(o, <u8>(0x80 | ((cp >> 6) & 0x3F)), 1);
    store<u8>(o, <u8>(0x80 | (cp & 0x3F)), 2);
    return o + 3;
  }
  store<u8>(o, <u8>(0xF0 | (cp >> 18)));
  store<u8>(o, <u8>(0x80 | ((cp >> 12) & 0x3F)), 1);
  store<u8>(o, <u8>(0x80 | ((cp >> 6) & 0x3F)), 2);
  store<u8>(o, <u8>(0x80 | (cp & 0x3F)), 3);
  return o + 4;
}

/**
 * Builds a flat JSON object as UTF-8 bytes, ready for emitEvent/publish
 * without another copy. Keep one in a global and `reset()` it per message to
 * avoid allocating at all.
 *
 *   doc.reset().field("metric", name).field("value", v).field("ok", true);
 *
 * Numbers are written in the shortest form that parses back to the same f64;
 * NaN and infinities (not JSON) are written as null.
 */
export class JsonWriter {
  private buffer: ArrayBuffer;
  private used: usize = 1; // bytes before the closing brace

  constructor(capacity: i32 = 128) {
    this.buffer = new ArrayBuffer(max(capacity, 2));
    this.reset();
  }

  /** Back to `{}`. */
  reset(): JsonWriter {
    store<u8>(changetype<usize>(this.buffer), 0x7B);
    this.used = 1;
    this.close();
    return this;
  }

  /** Adds `"key": value` for a string, a number (any integer or float type) or a bool. */
  field<T>(key: string, value: T): JsonWriter {
    this.beginField(key);
    if (isString<T>()) {
      this.putString(changetype<string>(value));
    } else if (isBoolean<T>()) {
      this.putAscii(value ? "true" : "false");
    } else if (isInteger<T>()) {
      // @ts-ignore: integer toString
      this.putAscii(value.toString());
    } else if (isFloat<T>()) {
      this.putNumber(<f64>value);
    } else {
      // @ts-ignore: compile-time error
      ERROR("JsonWriter.field: expected a string, number or bool");
    }
    this.close();
    return this;
  }

  /** Address of the document's bytes. */
  get ptr(): usize { return changetype<usize>(this.buffer); }
  /** Length of the document in bytes. */
  get length(): usize { return this.used + 1; }

  toString(): string {
    return String.UTF8.decodeUnsafe(this.ptr, this.length);
  }

  private reserve(extra: usize): usize {
    const need = this.used + extra + 1;
    const cap = <usize>this.buffer.byteLength;
    if (need > cap) {
      const grown = new ArrayBuffer(<i32>max(need, cap * 2));
      memory.copy(changetype<usize>(grown), changetype<usize>(this.buffer), this.used);
      this.buffer = grown;
    }
    return changetype<usize>(this.buffer) + this.used;
  }

  private close(): void {
    store<u8>(changetype<usize>(this.buffer) + this.used, 0x7D);
  }

  private beginField(key: string): void {
    if (this.used > 1) {
      store<u8>(this.reserve(1), 0x2C);
      this.used++;
    }
    this.putString(key);
    store<u8>(this.reserve(1), 0x3A);
    this.used++;
  }

  private putAscii(s: string): void {
    const n = <usize>s.length;
    let o = this.reserve(n);
    for (let i = 0; i < s.length; i++) store<u8>(o + <usize>i, <u8>s.charCodeAt(i));
    this.used += n;
  }

  private putNumber(v: f64): void {
    if (!isFinite(v)) {
      this.putAscii("null");
      return;
    }
    const s = v.toString();
    // AssemblyScript writes integral floats as "30.0"; JSON readers prefer "30".
    this.putAscii(s.endsWith(".0") ? s.substring(0, s.length - 2) : s);
  }

  // A JSON string literal: quotes, escapes, UTF-8 (lone surrogates -> U+FFFD).
  private putString(s: string): void {
    const units = s.length;
    let o = this.reserve(<usize>units * 6 + 2);
    const begin = o;
    store<u8>(o++, 0x22);
    for (let i = 0; i < units; i++) {
      let c = <u32>s.charCodeAt(i);
      if (c == 0x22 || c == 0x5C) {
        store<u8>(o++, 0x5C);
        store<u8>(o++, <u8>c);
      } else if (c < 0x20) {
        store<u8>(o++, 0x5C);
        if (c == 0x0A) store<u8>(o++, 0x6E);
        else if (c == 0x0D) store<u8>(o++, 0x72);
        else if (c == 0x09) store<u8>(o++, 0x74);
        else {
          store<u8>(o++, 0x75);
          store<u8>(o++, 0x30);
          store<u8>(o++, 0x30);
          store<u8>(o++, <u8>(0x30 + (c >> 4)));
          const d = c & 0xF;
          store<u8>(o++, <u8>(d < 10 ? 0x30 + d : 0x61 + d - 10));
        }
      } else {
        if (c >= 0xD800 && c <= 0xDFFF) {
          const lo = i + 1 < units ? <u32>s.charCodeAt(i + 1) : 0;
          if (c <= 0xDBFF && lo >= 0xDC00 && lo <= 0xDFFF) {
            c = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
            i++;
          } else {
            c = 0xFFFD;
          }
        }
        o = putCodePoint(o, c);
      }
    }
    store<u8>(o++, 0x22);
    this.used += o - begin;
  }
}

// ---------------------------------------------------------------------------
// `abort` (failed assertions, out-of-range indexes, `throw`) without the
// `env.abort` import AssemblyScript would otherwise need: log the reason,
// then trap so the host fails the call. Builds the line in static memory, as
// an abort may come from the allocator itself.

// Globals may not be initialised yet when an abort happens (it can come from
// the start function), hence the helpers take the line's end explicitly.
function abortAppend(o: usize, end: usize, s: string): usize {
  // 3 bytes per UTF-16 unit at most; never split a surrogate pair.
  let units = min<usize>(<usize>s.length, (end - o) / 3);
  if (units > 0 && units < <usize>s.length && (<u32>s.charCodeAt(<i32>units - 1) & 0xFC00) == 0xD800) units--;
  return o + String.UTF8.encodeUnsafe(changetype<usize>(s), <i32>units, o, false, String.UTF8.ErrorMode.REPLACE);
}

function abortAppendNumber(o: usize, end: usize, n: u32): usize {
  if (end - o < 10) return o;
  let digits: usize = 1;
  for (let t = n; t >= 10; t /= 10) digits++;
  for (let i = digits; i > 0; i--) {
    store<u8>(o + i - 1, <u8>(0x30 + n % 10));
    n /= 10;
  }
  return o + digits;
}

/** Installed as AssemblyScript's `abort` by `--use abort=sluiceAbort` (see asconfig.json). */
// @ts-ignore: decorator
@global
export function sluiceAbort(message: string | null, fileName: string | null, lineNumber: u32, columnNumber: u32): void {
  const line = memory.data(1024);
  const end = line + 1024;
  let o = abortAppend(line, end, "abort: ");
  o = abortAppend(o, end, message !== null ? message : "(no message)");
  if (fileName !== null) {
    o = abortAppend(o, end, " at ");
    o = abortAppend(o, end, fileName);
    o = abortAppend(o, end, ":");
    o = abortAppendNumber(o, end, lineNumber);
    o = abortAppend(o, end, ":");
    o = abortAppendNumber(o, end, columnNumber);
  }
  host.log(LogLevel.ERROR, line, o - line);
  unreachable();
}

/** Installed as AssemblyScript's `trace` by `--use trace=sluiceTrace`: a debug line in Sluice's log. */
// @ts-ignore: decorator
@global
export function sluiceTrace(message: string, n: i32 = 0, a0: f64 = 0, a1: f64 = 0, a2: f64 = 0, a3: f64 = 0, a4: f64 = 0): void {
  let line = message;
  if (n > 0) line += " " + a0.toString();
  if (n > 1) line += ", " + a1.toString();
  if (n > 2) line += ", " + a2.toString();
  if (n > 3) line += ", " + a3.toString();
  if (n > 4) line += ", " + a4.toString();
  log(LogLevel.DEBUG, line);
}
