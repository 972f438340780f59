//! average — per-device 1-minute averages of every top-level numeric field,
//! kept in rule state. When a device's value opens a new minute, the closed
//! minute is emitted as the point <metric>_avg_1m at the minute's start.
//!
//! State: key = metric, value = 24 bytes little endian:
//! i64 window_start_ms, f64 sum, u64 count.

const std = @import("std");
const sluice = @import("sluice");

const window_ms = 60_000;

const Window = struct {
    start_ms: i64,
    sum: f64,
    count: u64,

    const size = 24;

    // Explicit little endian, so the bytes mean the same to every SDK.
    fn encode(w: Window) [size]u8 {
        var b: [size]u8 = undefined;
        std.mem.writeInt(i64, b[0..8], w.start_ms, .little);
        std.mem.writeInt(u64, b[8..16], @bitCast(w.sum), .little);
        std.mem.writeInt(u64, b[16..24], w.count, .little);
        return b;
    }

    fn decode(b: *const [size]u8) Window {
        return .{
            .start_ms = std.mem.readInt(i64, b[0..8], .little),
            .sum = @bitCast(std.mem.readInt(u64, b[8..16], .little)),
            .count = std.mem.readInt(u64, b[16..24], .little),
        };
    }
};

export fn sluice_on_batch(ptr: usize, count: usize) i32 {
    return sluice.forEach(ptr, count, handle);
}

fn handle(m: sluice.Message) !void {
    var it = sluice.json.fields(m.payload()) catch return m.fail("payload is not a JSON object");
    const t = m.receivedAtMs();
    const minute = t - @mod(t, window_ms);
    while (it.next()) |f| {
        if (f.value != .number) continue;
        const v = f.value.number;
        var key_buf: [256]u8 = undefined;
        const metric = f.key.decode(&key_buf) orelse return error.KeyTooLong;

        var stored: [Window.size]u8 = undefined;
        const len = try m.stateGet(metric, &stored);
        // A value of another size is not ours to read: start afresh.
        if (len != null and len.? == Window.size) {
            const w = Window.decode(&stored);
            if (w.start_ms > minute) continue; // late data for a closed minute
            if (w.start_ms == minute) {
                try m.stateSet(metric, &Window.encode(.{ .start_ms = minute, .sum = w.sum + v, .count = w.count + 1 }));
                continue;
            }
            var name_buf: [256 + "_avg_1m".len]u8 = undefined;
            const name = sluice.concat(&name_buf, &.{ metric, "_avg_1m" }).?;
            try m.emitPoint(name, w.sum / @as(f64, @floatFromInt(w.count)), w.start_ms);
        }
        try m.stateSet(metric, &Window.encode(.{ .start_ms = minute, .sum = v, .count = 1 }));
    }
}
