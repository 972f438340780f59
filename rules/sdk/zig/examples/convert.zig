//! convert — rewrites every top-level numeric field of a flat JSON payload
//! as a point in SI units: *_f -> *_c, *_psi -> *_kpa, *_mph -> *_kmh. Other
//! numeric fields become points unchanged; non-numeric ones are skipped.

const std = @import("std");
const sluice = @import("sluice");

const Conversion = struct {
    suffix: []const u8,
    new_suffix: []const u8,
    convert: *const fn (f64) f64,
};

const conversions = [_]Conversion{
    .{ .suffix = "_f", .new_suffix = "_c", .convert = fahrenheitToCelsius },
    .{ .suffix = "_psi", .new_suffix = "_kpa", .convert = psiToKilopascal },
    .{ .suffix = "_mph", .new_suffix = "_kmh", .convert = mphToKmh },
};

fn fahrenheitToCelsius(v: f64) f64 {
    return (v - 32) * 5 / 9;
}

fn psiToKilopascal(v: f64) f64 {
    return v * 6.894757;
}

fn mphToKmh(v: f64) f64 {
    return v * 1.609344;
}

export fn sluice_on_batch(ptr: usize, count: usize) i32 {
    return sluice.forEach(ptr, count, handle);
}

fn handle(m: sluice.Message) !void {
    var it = sluice.json.fields(m.payload()) catch return m.fail("payload is not a JSON object");
    while (it.next()) |f| {
        if (f.value != .number) continue;
        const v = f.value.number;
        // Only keys with escapes need the buffer; plain keys are used in place.
        var key_buf: [1024]u8 = undefined;
        const key = f.key.decode(&key_buf) orelse return error.KeyTooLong;
        for (conversions) |c| {
            if (std.mem.endsWith(u8, key, c.suffix)) {
                var name_buf: [1024]u8 = undefined;
                const base = key[0 .. key.len - c.suffix.len];
                const name = sluice.concat(&name_buf, &.{ base, c.new_suffix }) orelse return error.KeyTooLong;
                try m.emitPoint(name, c.convert(v), sluice.time_of_message);
                break;
            }
        } else try m.emitPoint(key, v, sluice.time_of_message);
    }
}
