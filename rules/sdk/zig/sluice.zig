//! sluice.zig — write Sluice rule functions in Zig (ABI v1, see rules/ABI.md).
//!
//! A rule imports this file as the module `sluice` and exports its own
//! `sluice_on_batch` (and, if it takes a config, `sluice_init`):
//!
//!     const sluice = @import("sluice");
//!
//!     export fn sluice_on_batch(ptr: usize, count: usize) i32 {
//!         return sluice.forEach(ptr, count, handle);
//!     }
//!
//!     fn handle(m: sluice.Message) !void { ... }
//!
//! Importing it also exports the two functions every rule needs,
//! `sluice_abi_version` and `sluice_alloc`. Build for wasm32-freestanding; see
//! README.md beside this file. `zig test sluice.zig` runs the JSON tests natively.

const std = @import("std");
const builtin = @import("builtin");

pub const abi_version: i32 = 1;

/// A time argument meaning "the message's arrival time".
pub const time_of_message: i64 = std.math.minInt(i64);

// ---------------------------------------------------------------------------
// Host functions, exactly as the ABI declares them. Prefer the wrappers below;
// these are here for anyone who wants the raw status codes.

pub const host = struct {
    pub extern "sluice" fn emit_point(msg: i32, metric_ptr: [*]const u8, metric_len: usize, value: f64, time_ms: i64) i32;
    pub extern "sluice" fn emit_event(msg: i32, json_ptr: [*]const u8, json_len: usize, time_ms: i64) i32;
    pub extern "sluice" fn publish(msg: i32, topic_ptr: [*]const u8, topic_len: usize, payload_ptr: [*]const u8, payload_len: usize, qos: i32, retain: i32) i32;
    pub extern "sluice" fn drop_message(msg: i32) i32;
    pub extern "sluice" fn fail(msg: i32, reason_ptr: [*]const u8, reason_len: usize) i32;
    pub extern "sluice" fn log(level: i32, ptr: [*]const u8, len: usize) i32;
    pub extern "sluice" fn state_get(msg: i32, key_ptr: [*]const u8, key_len: usize, buf_ptr: [*]u8, buf_cap: usize) i32;
    pub extern "sluice" fn state_set(msg: i32, key_ptr: [*]const u8, key_len: usize, value_ptr: [*]const u8, value_len: usize) i32;
    pub extern "sluice" fn state_delete(msg: i32, key_ptr: [*]const u8, key_len: usize) i32;
};

/// Status codes returned by the host functions.
pub const status = struct {
    pub const ok: i32 = 0;
    pub const bad_message: i32 = -1;
    pub const bad_memory: i32 = -2;
    pub const limit: i32 = -3;
    pub const invalid: i32 = -4;
    pub const no_device: i32 = -5;
    pub const not_found: i32 = -6;
};

/// A non-OK status as a Zig error. Nothing was recorded when one is returned.
pub const Error = error{
    BadMessage,
    BadMemory,
    Limit,
    Invalid,
    NoDevice,
    NotFound,
    UnknownStatus,
};

pub fn check(code: i32) Error!void {
    return switch (code) {
        status.ok => {},
        status.bad_message => error.BadMessage,
        status.bad_memory => error.BadMemory,
        status.limit => error.Limit,
        status.invalid => error.Invalid,
        status.no_device => error.NoDevice,
        status.not_found => error.NotFound,
        else => if (code > 0) {} else error.UnknownStatus,
    };
}

// ---------------------------------------------------------------------------
// Exports every rule needs.

extern var __heap_base: u8;

fn abiVersion() callconv(.c) i32 {
    return abi_version;
}

// The host never holds two buffers at once, so one buffer at the heap base,
// grown on demand, serves every call. Nothing else lives above the heap base.
fn alloc(size: usize) callconv(.c) usize {
    const base = @intFromPtr(&__heap_base);
    const end = @as(u64, base) + size;
    const have = @as(u64, @wasmMemorySize(0)) * 65536;
    if (end > have) {
        const pages: usize = @intCast((end - have + 65535) / 65536);
        if (@wasmMemoryGrow(0, pages) < 0) return 0;
    }
    return base;
}

comptime {
    // Only on wasm, so that `zig test sluice.zig` can run natively.
    if (builtin.cpu.arch.isWasm()) {
        @export(&abiVersion, .{ .name = "sluice_abi_version" });
        @export(&alloc, .{ .name = "sluice_alloc" });
    }
}

// ---------------------------------------------------------------------------
// Messages.

/// One message of a batch, as the host lays it out (40 bytes, little endian).
pub const Descriptor = extern struct {
    topic_ptr: u32,
    topic_len: u32,
    payload_ptr: u32,
    payload_len: u32,
    device_ptr: u32,
    device_len: u32,
    received_at_ms: i64,
    qos: u8,
    retain: u8,
    hops: u8,
    reserved: [5]u8,
};

comptime {
    std.debug.assert(@sizeOf(Descriptor) == 40);
}

fn bytesAt(ptr: u32, len: u32) []const u8 {
    if (len == 0) return "";
    return @as([*]const u8, @ptrFromInt(ptr))[0..len];
}

/// A view of message `index` of the current batch. Valid only during the
/// `sluice_on_batch` call that received it.
pub const Message = struct {
    index: i32,
    desc: *align(1) const Descriptor,

    pub fn topic(m: Message) []const u8 {
        return bytesAt(m.desc.topic_ptr, m.desc.topic_len);
    }

    /// The payload as received: any bytes, not necessarily UTF-8.
    pub fn payload(m: Message) []const u8 {
        return bytesAt(m.desc.payload_ptr, m.desc.payload_len);
    }

    /// The device id, or null when the message has none.
    pub fn device(m: Message) ?[]const u8 {
        if (m.desc.device_len == 0) return null;
        return bytesAt(m.desc.device_ptr, m.desc.device_len);
    }

    /// Arrival time, Unix epoch milliseconds.
    pub fn receivedAtMs(m: Message) i64 {
        return m.desc.received_at_ms;
    }

    /// How many rule publishes led to this message.
    pub fn hops(m: Message) u8 {
        return m.desc.hops;
    }

    /// A point (device of m, metric, time, value). Pass `time_of_message` for
    /// the arrival time. Invalid for an empty metric or a NaN/infinite value.
    pub fn emitPoint(m: Message, metric: []const u8, value: f64, time_ms: i64) Error!void {
        return check(host.emit_point(m.index, metric.ptr, metric.len, value, time_ms));
    }

    /// An event: `json` must be a JSON document (json.Writer makes one).
    pub fn emitEvent(m: Message, json_doc: []const u8, time_ms: i64) Error!void {
        return check(host.emit_event(m.index, json_doc.ptr, json_doc.len, time_ms));
    }

    pub fn publish(m: Message, to_topic: []const u8, body: []const u8, qos: u2, retain: bool) Error!void {
        return check(host.publish(m.index, to_topic.ptr, to_topic.len, body.ptr, body.len, qos, @intFromBool(retain)));
    }

    /// Drops the message on purpose, discarding what it emitted in this call.
    pub fn drop(m: Message) Error!void {
        return check(host.drop_message(m.index));
    }

    /// Sends the message to the dead letters with this reason.
    pub fn fail(m: Message, reason: []const u8) Error!void {
        return check(host.fail(m.index, reason.ptr, reason.len));
    }

    /// Copies the value of `key` (state of this rule and m's device) into buf.
    /// Returns its length, or null when the key has no value. A length above
    /// buf.len means nothing was copied: call again with a bigger buffer.
    pub fn stateGet(m: Message, key: []const u8, buf: []u8) Error!?usize {
        const n = host.state_get(m.index, key.ptr, key.len, buf.ptr, buf.len);
        if (n == status.not_found) return null;
        try check(n);
        return @intCast(n);
    }

    /// Limit when the device's state for this rule would exceed the rule's
    /// state limit; the message then goes to the dead letters anyway.
    pub fn stateSet(m: Message, key: []const u8, value: []const u8) Error!void {
        return check(host.state_set(m.index, key.ptr, key.len, value.ptr, value.len));
    }

    pub fn stateDelete(m: Message, key: []const u8) Error!void {
        return check(host.state_delete(m.index, key.ptr, key.len));
    }
};

/// The messages of one `sluice_on_batch(ptr, count)` call, in order.
pub const Batch = struct {
    descs: [*]align(1) const Descriptor,
    count: usize,
    next_index: usize = 0,

    pub fn init(ptr: usize, count: usize) Batch {
        return .{ .descs = @ptrFromInt(ptr), .count = count };
    }

    pub fn at(b: Batch, i: usize) Message {
        return .{ .index = @intCast(i), .desc = &b.descs[i] };
    }

    pub fn next(b: *Batch) ?Message {
        if (b.next_index >= b.count) return null;
        defer b.next_index += 1;
        return b.at(b.next_index);
    }
};

/// Calls `handler` for every message of the batch and returns 0 for
/// `sluice_on_batch`. A message whose handler returns an error goes to the
/// dead letters with the error as the reason, so one bad message never fails
/// the batch.
pub fn forEach(ptr: usize, count: usize, comptime handler: fn (Message) anyerror!void) i32 {
    var batch = Batch.init(ptr, count);
    while (batch.next()) |m| {
        handler(m) catch |err| m.fail(errorReason(err)) catch {};
    }
    return 0;
}

/// A dead-letter reason for an error a handler returned.
pub fn errorReason(err: anyerror) []const u8 {
    return switch (err) {
        error.BadMessage => "host call failed: message index not in this batch",
        error.BadMemory => "host call failed: pointer outside memory or text not UTF-8",
        error.Limit => "host call failed: limit reached",
        error.Invalid => "host call failed: invalid argument",
        error.NoDevice => "host call failed: the message has no device",
        error.NotFound => "host call failed: not found",
        else => @errorName(err),
    };
}

// ---------------------------------------------------------------------------
// Logging.

pub const LogLevel = enum(i32) { err = 0, warn = 1, info = 2, debug = 3, trace = 4 };

pub fn log(level: LogLevel, text: []const u8) void {
    _ = host.log(@intFromEnum(level), text.ptr, text.len);
}

/// Formats into a 1 KiB buffer (the host's line limit); longer lines are cut
/// at a character boundary, because the host refuses text that is not UTF-8.
pub fn logf(level: LogLevel, comptime fmt: []const u8, args: anytype) void {
    var buf: [1024]u8 = undefined;
    const text = std.fmt.bufPrint(&buf, fmt, args) catch blk: {
        var end = buf.len;
        while (end > 0 and buf[end - 1] & 0xC0 == 0x80) end -= 1;
        if (end > 0 and buf[end - 1] >= 0xC0) end -= 1;
        break :blk buf[0..end];
    };
    log(level, text);
}

// ---------------------------------------------------------------------------
// Flat JSON: just enough to read a telemetry object's top-level fields and to
// write small documents, without an allocator.

pub const json = struct {
    /// Nesting deeper than this inside a payload makes it "not a JSON object".
    pub const max_depth = 512;

    /// A JSON string's text between its quotes, escapes not yet decoded.
    pub const String = struct {
        raw: []const u8,

        /// Whether the decoded string equals `text`; never needs a buffer.
        pub fn eql(s: String, text: []const u8) bool {
            var i: usize = 0;
            var j: usize = 0;
            var unit: [4]u8 = undefined;
            while (i < s.raw.len) {
                const part = nextPart(s.raw, &i, &unit);
                if (part.len > text.len - j or !std.mem.eql(u8, part, text[j..][0..part.len])) return false;
                j += part.len;
            }
            return j == text.len;
        }

        /// The decoded string: `raw` itself when it has no escapes, otherwise
        /// decoded into buf (null if buf is too small).
        pub fn decode(s: String, buf: []u8) ?[]const u8 {
            if (std.mem.indexOfScalar(u8, s.raw, '\\') == null) return s.raw;
            var i: usize = 0;
            var n: usize = 0;
            var unit: [4]u8 = undefined;
            while (i < s.raw.len) {
                const part = nextPart(s.raw, &i, &unit);
                if (part.len > buf.len - n) return null;
                @memcpy(buf[n..][0..part.len], part);
                n += part.len;
            }
            return buf[0..n];
        }
    };

    pub const Value = union(enum) {
        number: f64,
        string: String,
        boolean: bool,
        null,
        /// The nested value's JSON text; `json.fields` reads an object's.
        object: []const u8,
        array: []const u8,
    };

    pub const Field = struct { key: String, value: Value };

    /// Top-level fields of an object `fields` has already validated.
    pub const Fields = struct {
        src: []const u8,
        pos: usize,

        pub fn next(it: *Fields) ?Field {
            var p = skipSpace(it.src, it.pos);
            if (it.src[p] == '}') return null;
            if (it.src[p] == ',') p = skipSpace(it.src, p + 1);
            const key_end = scanString(it.src, p) catch unreachable;
            const key = String{ .raw = it.src[p + 1 .. key_end - 1] };
            p = skipSpace(it.src, skipSpace(it.src, key_end) + 1); // past ':'
            const end = scanValue(it.src, p) catch unreachable;
            const text = it.src[p..end];
            it.pos = end;
            return .{
                .key = key,
                .value = switch (text[0]) {
                    '"' => .{ .string = .{ .raw = text[1 .. text.len - 1] } },
                    '{' => .{ .object = text },
                    '[' => .{ .array = text },
                    't' => .{ .boolean = true },
                    'f' => .{ .boolean = false },
                    'n' => .null,
                    // Out-of-range numbers read as ±inf (emitPoint refuses those).
                    else => .{ .number = std.fmt.parseFloat(f64, text) catch unreachable },
                },
            };
        }
    };

    /// Validates all of `src` as one JSON object (surrounding whitespace
    /// allowed) before the first field is read, so a rule can refuse a bad
    /// payload before it emits anything.
    pub fn fields(src: []const u8) error{NotAnObject}!Fields {
        const start = skipSpace(src, 0);
        if (start >= src.len or src[start] != '{') return error.NotAnObject;
        const end = scanValue(src, start) catch return error.NotAnObject;
        if (skipSpace(src, end) != src.len) return error.NotAnObject;
        return .{ .src = src[0..end], .pos = start + 1 };
    }

    const Invalid = error{Invalid};

    fn skipSpace(src: []const u8, from: usize) usize {
        var p = from;
        while (p < src.len) : (p += 1) switch (src[p]) {
            ' ', '\t', '\n', '\r' => {},
            else => break,
        };
        return p;
    }

    /// Returns the end of the value starting at src[start]. Iterative, so
    /// hostile nesting costs a bit set rather than stack.
    fn scanValue(src: []const u8, start: usize) Invalid!usize {
        var in_object = std.StaticBitSet(max_depth).initEmpty();
        var depth: usize = 0;
        var p = start;
        value: while (true) {
            p = skipSpace(src, p);
            if (p >= src.len) return error.Invalid;
            switch (src[p]) {
                '{', '[' => |c| {
                    if (depth == max_depth) return error.Invalid;
                    in_object.setValue(depth, c == '{');
                    depth += 1;
                    p = skipSpace(src, p + 1);
                    if (p < src.len and src[p] == @as(u8, if (c == '{') '}' else ']')) {
                        p += 1;
                        depth -= 1;
                    } else {
                        if (c == '{') p = try scanKey(src, p);
                        continue :value;
                    }
                },
                '"' => p = try scanString(src, p),
                't' => p = try scanLiteral(src, p, "true"),
                'f' => p = try scanLiteral(src, p, "false"),
                'n' => p = try scanLiteral(src, p, "null"),
                else => p = try scanNumber(src, p),
            }
            while (depth > 0) {
                p = skipSpace(src, p);
                if (p >= src.len) return error.Invalid;
                const obj = in_object.isSet(depth - 1);
                if (src[p] == ',') {
                    p += 1;
                    if (obj) p = try scanKey(src, p);
                    continue :value;
                }
                if (src[p] != @as(u8, if (obj) '}' else ']')) return error.Invalid;
                p += 1;
                depth -= 1;
            }
            return p;
        }
    }

    /// A key and its colon; returns where the value may start.
    fn scanKey(src: []const u8, from: usize) Invalid!usize {
        var p = skipSpace(src, from);
        if (p >= src.len or src[p] != '"') return error.Invalid;
        p = skipSpace(src, try scanString(src, p));
        if (p >= src.len or src[p] != ':') return error.Invalid;
        return p + 1;
    }

    fn scanString(src: []const u8, start: usize) Invalid!usize {
        var p = start + 1;
        while (p < src.len) {
            switch (src[p]) {
                '"' => {
                    if (!std.unicode.utf8ValidateSlice(src[start + 1 .. p])) return error.Invalid;
                    return p + 1;
                },
                '\\' => {
                    if (p + 1 >= src.len) return error.Invalid;
                    switch (src[p + 1]) {
                        '"', '\\', '/', 'b', 'f', 'n', 'r', 't' => p += 2,
                        'u' => {
                            if (p + 6 > src.len) return error.Invalid;
                            for (src[p + 2 .. p + 6]) |h| if (!std.ascii.isHex(h)) return error.Invalid;
                            p += 6;
                        },
                        else => return error.Invalid,
                    }
                },
                0...0x1f => return error.Invalid,
                else => p += 1,
            }
        }
        return error.Invalid;
    }

    fn scanLiteral(src: []const u8, p: usize, word: []const u8) Invalid!usize {
        if (!std.mem.startsWith(u8, src[p..], word)) return error.Invalid;
        return p + word.len;
    }

    fn scanDigits(src: []const u8, from: usize) Invalid!usize {
        var p = from;
        while (p < src.len and std.ascii.isDigit(src[p])) p += 1;
        if (p == from) return error.Invalid;
        return p;
    }

    /// -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    fn scanNumber(src: []const u8, start: usize) Invalid!usize {
        var p = start;
        if (src[p] == '-') p += 1;
        if (p < src.len and src[p] == '0') {
            p += 1;
        } else {
            p = try scanDigits(src, p);
        }
        if (p < src.len and src[p] == '.') p = try scanDigits(src, p + 1);
        if (p < src.len and (src[p] == 'e' or src[p] == 'E')) {
            p += 1;
            if (p < src.len and (src[p] == '+' or src[p] == '-')) p += 1;
            p = try scanDigits(src, p);
        }
        return p;
    }

    /// The next piece of a validated string body: a run of plain bytes, or
    /// the UTF-8 bytes of one escape (written to `unit`).
    fn nextPart(raw: []const u8, i: *usize, unit: *[4]u8) []const u8 {
        const start = i.*;
        if (raw[start] != '\\') {
            i.* = std.mem.indexOfScalarPos(u8, raw, start, '\\') orelse raw.len;
            return raw[start..i.*];
        }
        i.* += 2;
        unit[0] = switch (raw[start + 1]) {
            'b' => 0x08,
            'f' => 0x0c,
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                var cp: u21 = hex4(raw[i.*..][0..4]);
                i.* += 4;
                if (cp >= 0xD800 and cp < 0xDC00 and i.* + 6 <= raw.len and raw[i.*] == '\\' and raw[i.* + 1] == 'u') {
                    const low = hex4(raw[i.* + 2 ..][0..4]);
                    if (low >= 0xDC00 and low < 0xE000) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                        i.* += 6;
                    }
                }
                // A lone surrogate has no UTF-8 form, and the host wants UTF-8.
                if (cp >= 0xD800 and cp < 0xE000) cp = 0xFFFD;
                const n = std.unicode.utf8Encode(cp, unit) catch unreachable;
                return unit[0..n];
            },
            else => |c| c, // " \ /
        };
        return unit[0..1];
    }

    fn hex4(h: *const [4]u8) u21 {
        var v: u21 = 0;
        for (h) |c| v = v * 16 + (std.fmt.charToDigit(c, 16) catch unreachable);
        return v;
    }

    /// Room for any number `formatNumber` writes.
    pub const number_buf_len = 64;

    /// Shortest text that parses back to exactly `v`; plain decimals where
    /// they stay short, exponents otherwise. NaN and infinities have no JSON
    /// form and come out as `null`.
    pub fn formatNumber(buf: *[number_buf_len]u8, v: f64) []const u8 {
        if (!std.math.isFinite(v)) return "null";
        const a = @abs(v);
        const decimal = a == 0 or (a >= 1e-6 and a < 1e21);
        // std's Ryu printer moved in Zig 0.15; the other branch is never compiled.
        if (@hasDecl(std.fmt, "format_float")) {
            const f = std.fmt.format_float;
            return f.formatFloat(buf, v, .{ .mode = if (decimal) .decimal else .scientific }) catch unreachable;
        } else {
            const f = std.fmt.float;
            return f.render(buf, v, .{ .mode = if (decimal) .decimal else .scientific }) catch unreachable;
        }
    }

    /// Writes a JSON document into a fixed buffer. Calls never fail; `finish`
    /// reports whether everything fitted.
    ///
    ///     var w = json.Writer.init(&buf);
    ///     w.beginObject();
    ///     w.field("metric", name);
    ///     w.field("value", 31.5);
    ///     w.endObject();
    ///     const doc = try w.finish();
    pub const Writer = struct {
        buf: []u8,
        len: usize = 0,
        overflow: bool = false,
        need_comma: bool = false,
        after_key: bool = false,

        pub fn init(buf: []u8) Writer {
            return .{ .buf = buf };
        }

        pub fn finish(w: *const Writer) error{NoSpaceLeft}![]const u8 {
            if (w.overflow) return error.NoSpaceLeft;
            return w.buf[0..w.len];
        }

        pub fn beginObject(w: *Writer) void {
            w.open("{");
        }

        pub fn endObject(w: *Writer) void {
            w.close("}");
        }

        pub fn beginArray(w: *Writer) void {
            w.open("[");
        }

        pub fn endArray(w: *Writer) void {
            w.close("]");
        }

        pub fn key(w: *Writer, k: []const u8) void {
            if (w.need_comma) w.raw(",");
            w.quoted(k);
            w.raw(":");
            w.after_key = true;
        }

        pub fn string(w: *Writer, s: []const u8) void {
            w.valueStart();
            w.quoted(s);
        }

        pub fn number(w: *Writer, v: f64) void {
            w.valueStart();
            var b: [number_buf_len]u8 = undefined;
            w.raw(formatNumber(&b, v));
        }

        /// Integers print exactly, even beyond 2^53.
        pub fn integer(w: *Writer, v: i64) void {
            w.valueStart();
            var b: [20]u8 = undefined;
            var i: usize = b.len;
            var u: u64 = @abs(v);
            while (true) {
                i -= 1;
                b[i] = '0' + @as(u8, @intCast(u % 10));
                u /= 10;
                if (u == 0) break;
            }
            if (v < 0) w.raw("-");
            w.raw(b[i..]);
        }

        pub fn boolean(w: *Writer, v: bool) void {
            w.valueStart();
            w.raw(if (v) "true" else "false");
        }

        pub fn @"null"(w: *Writer) void {
            w.valueStart();
            w.raw("null");
        }

        /// `key` then a value chosen by type: text, float, integer, bool,
        /// null, or an optional of those.
        pub fn field(w: *Writer, k: []const u8, value: anytype) void {
            w.key(k);
            w.anyValue(value);
        }

        pub fn anyValue(w: *Writer, value: anytype) void {
            switch (@typeInfo(@TypeOf(value))) {
                .bool => w.boolean(value),
                .float, .comptime_float => w.number(value),
                .int, .comptime_int => w.integer(value),
                .null => w.null(),
                .optional => if (value) |v| w.anyValue(v) else w.null(),
                else => w.string(value),
            }
        }

        /// Text that is already JSON, inserted as one value.
        pub fn rawValue(w: *Writer, json_text: []const u8) void {
            w.valueStart();
            w.raw(json_text);
        }

        fn open(w: *Writer, c: []const u8) void {
            w.valueStart();
            w.raw(c);
            w.need_comma = false;
        }

        fn close(w: *Writer, c: []const u8) void {
            w.raw(c);
            w.need_comma = true;
        }

        fn valueStart(w: *Writer) void {
            if (w.need_comma and !w.after_key) w.raw(",");
            w.after_key = false;
            w.need_comma = true;
        }

        fn raw(w: *Writer, bytes: []const u8) void {
            if (w.overflow) return;
            if (bytes.len > w.buf.len - w.len) {
                w.overflow = true;
                return;
            }
            @memcpy(w.buf[w.len..][0..bytes.len], bytes);
            w.len += bytes.len;
        }

        fn quoted(w: *Writer, s: []const u8) void {
            w.raw("\"");
            var run: usize = 0;
            for (s, 0..) |c, i| {
                var esc: [6]u8 = undefined;
                const e: []const u8 = switch (c) {
                    '"' => "\\\"",
                    '\\' => "\\\\",
                    '\n' => "\\n",
                    '\r' => "\\r",
                    '\t' => "\\t",
                    0...0x08, 0x0b, 0x0c, 0x0e...0x1f => blk: {
                        esc = "\\u00XX".*;
                        esc[4] = std.fmt.digitToChar(c >> 4, .lower);
                        esc[5] = std.fmt.digitToChar(c & 15, .lower);
                        break :blk &esc;
                    },
                    else => continue,
                };
                w.raw(s[run..i]);
                w.raw(e);
                run = i + 1;
            }
            w.raw(s[run..]);
            w.raw("\"");
        }
    };
};

/// Joins `parts` into buf; null if they do not fit. For topics and metric
/// names built from pieces.
pub fn concat(buf: []u8, parts: []const []const u8) ?[]const u8 {
    var n: usize = 0;
    for (parts) |p| {
        if (p.len > buf.len - n) return null;
        @memcpy(buf[n..][0..p.len], p);
        n += p.len;
    }
    return buf[0..n];
}

// ---------------------------------------------------------------------------
// Tests: `zig test sluice.zig` (native; the host functions are not needed).

const testing = std.testing;

fn expectFields(src: []const u8, expected: []const []const u8) !void {
    var it = try json.fields(src);
    var i: usize = 0;
    var buf: [64]u8 = undefined;
    while (it.next()) |f| : (i += 1) {
        try testing.expect(i < expected.len);
        try testing.expectEqualStrings(expected[i], f.key.decode(&buf).?);
    }
    try testing.expectEqual(expected.len, i);
}

test "top-level fields in order, nested values and strings skipped" {
    try expectFields(
        \\ {"temperature":-5e1,"nested":{"temperature":99,"list":[1,{"a":"}"}]},"x":"a \"q\" b:1,","t":true,"n":null,"e":[]} 
    , &.{ "temperature", "nested", "x", "t", "n", "e" });
    try expectFields("{}", &.{});
    try expectFields("{ \"k\\u00e9\\n\" : {} }", &.{"k\u{e9}\n"});
}

test "values" {
    var it = try json.fields(
        \\{"a":1.5,"b":"s\u00e9","c":false,"d":null,"e":{"x":[1]},"f":[2],"g":-0,"h":1e400}
    );
    try testing.expectEqual(@as(f64, 1.5), it.next().?.value.number);
    const b = it.next().?;
    try testing.expect(b.key.eql("b"));
    try testing.expect(b.value.string.eql("s\u{e9}"));
    try testing.expect(!b.value.string.eql("s"));
    try testing.expectEqual(false, it.next().?.value.boolean);
    try testing.expect(it.next().?.value == .null);
    try testing.expectEqualStrings("{\"x\":[1]}", it.next().?.value.object);
    try testing.expectEqualStrings("[2]", it.next().?.value.array);
    try testing.expectEqual(@as(f64, 0), it.next().?.value.number);
    try testing.expect(std.math.isInf(it.next().?.value.number));
    try testing.expect(it.next() == null);
    try testing.expect(it.next() == null);
}

test "not an object" {
    const bad = [_][]const u8{
        "",                  "not json",    "[1,2]",           "1",                 "\"s\"",            "{",
        "{}x",               "{} {}",       "{\"a\":1,}",      "{\"a\"}",           "{\"a\":}",         "{a:1}",
        "{\"a\":01}",        "{\"a\":1.}",  "{\"a\":.5}",      "{\"a\":1e}",        "{\"a\":+1}",       "{\"a\":tru}",
        "{\"a\":[1,]}",      "{\"a\":[}",   "{\"a\":\"\\x\"}", "{\"a\":\"\\u12\"}", "{\"a\":\"\x01\"}", "{\"a\":\"\xff\"}",
        "{\"a\":{\"b\":1]}", "{\"a\":1 2}",
    };
    for (bad) |src| {
        if (json.fields(src)) |_| {
            std.debug.print("accepted: {s}\n", .{src});
            return error.TestUnexpectedResult;
        } else |_| {}
    }
}

test "nesting limit" {
    const deep = "{\"a\":" ++ "[" ** (json.max_depth - 1) ++ "]" ** (json.max_depth - 1) ++ "}";
    _ = try json.fields(deep);
    const too_deep = "{\"a\":" ++ "[" ** json.max_depth ++ "]" ** json.max_depth ++ "}";
    try testing.expectError(error.NotAnObject, json.fields(too_deep));
}

test "string decoding" {
    var it = try json.fields("{\"\\ud83d\\ude00 \\ud800 \\\"\\\\\\/\\b\\f\\r\\t\":0}");
    var buf: [32]u8 = undefined;
    const k = it.next().?.key;
    try testing.expectEqualStrings("\u{1F600} \u{FFFD} \"\\/\x08\x0c\r\t", k.decode(&buf).?);
    try testing.expect(k.eql("\u{1F600} \u{FFFD} \"\\/\x08\x0c\r\t"));
    var small: [3]u8 = undefined;
    try testing.expect(k.decode(&small) == null);
}

test "writer" {
    var buf: [256]u8 = undefined;
    var w = json.Writer.init(&buf);
    w.beginObject();
    w.field("metric", "te\"mp\n\x01");
    w.field("value", 31.5);
    w.field("threshold", 30.0);
    w.field("n", @as(i64, std.math.minInt(i64)));
    w.key("list");
    w.beginArray();
    w.number(1e-7);
    w.beginObject();
    w.endObject();
    w.boolean(true);
    w.null();
    w.endArray();
    w.field("inf", std.math.inf(f64));
    w.endObject();
    try testing.expectEqualStrings(
        \\{"metric":"te\"mp\n\u0001","value":31.5,"threshold":30,"n":-9223372036854775808,"list":[1e-7,{},true,null],"inf":null}
    , try w.finish());

    var tiny: [4]u8 = undefined;
    var t = json.Writer.init(&tiny);
    t.beginObject();
    t.field("k", 1);
    t.endObject();
    try testing.expectError(error.NoSpaceLeft, t.finish());
}

test "numbers round-trip" {
    const vals = [_]f64{ 0, -0.0, 30, 31.5, 99.9739765, 0.1, 1.0 / 3.0, 1e-6, 9.99e-7, 1e21, 1.2345678901234568e17, 5e-324, std.math.floatMax(f64), -2.5e-300 };
    for (vals) |v| {
        var b: [json.number_buf_len]u8 = undefined;
        const text = json.formatNumber(&b, v);
        try testing.expectEqual(v, try std.fmt.parseFloat(f64, text));
        var doc: [80]u8 = undefined;
        _ = try json.fields(concat(&doc, &.{ "{\"v\":", text, "}" }).?);
    }
    var b: [json.number_buf_len]u8 = undefined;
    try testing.expectEqualStrings("30", json.formatNumber(&b, 30));
    try testing.expectEqualStrings("1e21", json.formatNumber(&b, 1e21));
}
