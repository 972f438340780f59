//! threshold — raises an alert event, and publishes it on alerts/{device},
//! when a metric of a flat JSON payload goes above a threshold.
//!
//! Config (sluice_init): {"metric": "temperature", "threshold": 30}, also the
//! defaults. Event and publish payload:
//! {"metric":"<metric>","value":<value>,"threshold":<threshold>}

const sluice = @import("sluice");

// The config outlives the sluice_init buffer (the host reuses it for the
// batches), so the metric name is copied here.
var metric_buf: [256]u8 = undefined;
var metric: []const u8 = "temperature";
var threshold: f64 = 30;

export fn sluice_init(ptr: [*]const u8, len: usize) i32 {
    var it = sluice.json.fields(ptr[0..len]) catch return 1;
    while (it.next()) |f| {
        if (f.key.eql("metric")) {
            if (f.value != .string) return 1;
            var tmp: [256]u8 = undefined;
            const name = f.value.string.decode(&tmp) orelse return 1;
            metric = sluice.concat(&metric_buf, &.{name}) orelse return 1;
        } else if (f.key.eql("threshold")) {
            if (f.value != .number) return 1;
            threshold = f.value.number;
        }
    }
    return 0;
}

export fn sluice_on_batch(ptr: usize, count: usize) i32 {
    return sluice.forEach(ptr, count, handle);
}

fn handle(m: sluice.Message) !void {
    var it = sluice.json.fields(m.payload()) catch return m.fail("payload is not a JSON object");
    var value: ?f64 = null;
    while (it.next()) |f| {
        // The last occurrence wins, as with most JSON parsers.
        if (f.key.eql(metric)) value = if (f.value == .number) f.value.number else null;
    }
    const v = value orelse return m.drop();
    if (!(v > threshold)) return m.drop();

    // The alert topic needs a device; check before emitting anything.
    const device = m.device() orelse return m.fail("message has no device for the alert topic");
    var topic_buf: [1024]u8 = undefined;
    const topic = sluice.concat(&topic_buf, &.{ "alerts/", device }) orelse return m.fail("device id too long for the alert topic");

    // Room for a 256-byte metric even if every byte needs a 6-byte escape.
    var doc_buf: [2048]u8 = undefined;
    var w = sluice.json.Writer.init(&doc_buf);
    w.beginObject();
    w.field("metric", metric);
    w.field("value", v);
    w.field("threshold", threshold);
    w.endObject();
    const doc = try w.finish();

    try m.emitEvent(doc, sluice.time_of_message);
    try m.publish(topic, doc, 1, false);
}
