/*
 * average — per-device one-minute averages of every numeric field, kept in
 * rule state. Each field (metric) has one open window: the minute, by arrival
 * time, of its latest values. The first value of a later minute closes the
 * window, emitting the point <metric>_avg_1m = sum / count timed at the
 * window's start, and opens the next; values older than the open window are
 * ignored. Fields that are not numbers are skipped; a payload that is not a
 * JSON object is failed.
 */
#define SLUICE_IMPLEMENTATION
#include "sluice.h"

#define WINDOW_MS 60000

/* A metric's state value: i64 window start (ms), f64 sum, u64 count, 24
 * bytes little-endian. That is this struct's layout in wasm memory, so it is
 * stored and loaded as is. */
typedef struct {
    int64_t start_ms;
    double sum;
    uint64_t count;
} window;
_Static_assert(sizeof(window) == 24, "the state value is 24 bytes");

static void average(int32_t i, const sluice_message *m) {
    const char *payload = sluice_payload(m);
    int32_t payload_len = (int32_t)m->payload_len;
    /* Checked up front, before any state is read (the host would discard
     * the state changes of a failed message anyway). */
    if (!sluice_json_is_object(payload, payload_len)) {
        sluice_fail(i, SLUICE_LIT("payload is not a JSON object"));
        return;
    }
    if (m->device_len == 0) {
        sluice_fail(i, SLUICE_LIT("averages are kept per device, and this message has none"));
        return;
    }
    int64_t t = m->received_at_ms;
    int64_t minute = t - ((t % WINDOW_MS) + WINDOW_MS) % WINDOW_MS; /* floor, also before 1970 */

    sluice_json_reader r = sluice_json_read(payload, payload_len);
    sluice_json_field f;
    while (sluice_json_next(&r, &f) == SLUICE_JSON_FIELD) {
        if (f.type != SLUICE_JSON_NUMBER) continue;
        char metric[SLUICE_STATE_KEY_MAX];
        int32_t len = sluice_json_unescape(f.key, f.key_len, metric, sizeof metric);
        if (len < 1) {
            sluice_fail(i, SLUICE_LIT("a numeric field's name is not 1 to 256 bytes, the size of a state key"));
            return;
        }
        window w;
        int32_t got = sluice_state_get(i, metric, len, &w, sizeof w);
        if (got < 0 && got != SLUICE_NOT_FOUND) {
            sluice_fail(i, SLUICE_LIT("state_get refused the metric's key"));
            return;
        }
        /* A value of another size was not written by this rule's format:
         * start over rather than misread it. */
        int open = got == (int32_t)sizeof w;
        if (open && w.start_ms > minute) continue; /* late: that minute was already emitted */
        if (open && w.start_ms == minute) {
            w.sum += f.number;
            w.count++;
        } else {
            if (open) {
                char point[SLUICE_STATE_KEY_MAX + 8];
                sluice_writer p = sluice_writer_on(point, sizeof point);
                sluice_write_raw(&p, metric, len);
                sluice_write_raw(&p, SLUICE_LIT("_avg_1m"));
                if (sluice_emit_point(i, point, sluice_write_done(&p), w.sum / (double)w.count, w.start_ms) != SLUICE_OK) {
                    sluice_fail(i, SLUICE_LIT("the host refused an average point"));
                    return;
                }
            }
            w.start_ms = minute;
            w.sum = f.number;
            w.count = 1;
        }
        /* Refused only for the rule's state limit, and then the host sends
         * the message to the dead letters itself. */
        if (sluice_state_set(i, metric, len, &w, sizeof w) != SLUICE_OK) return;
    }
}

int32_t sluice_on_batch(const sluice_message *msgs, int32_t count) {
    for (int32_t i = 0; i < count; i++) average(i, &msgs[i]);
    return 0;
}
