/*
 * {{name}}: a Sluice rule function (ABI v1) in C.
 *
 * Every numeric top-level field of a message's JSON payload becomes a point
 * named after the field, at the message's arrival time, and each message gets
 * a line in Sluice's log. A payload that is not a JSON object goes to the
 * dead letters; a message with no numeric field produces nothing (it is
 * counted as dropped).
 *
 * sluice.h, beside this file, is Sluice's C SDK: the host functions
 * (sluice_emit_event, sluice_publish, state...), a JSON reader and writer,
 * and the exports every module needs. To take a configuration (the
 * manifest's [config] table, as JSON), define
 *   SLUICE_EXPORT(sluice_init) int32_t sluice_init(const char *json, int32_t len)
 * and return 0.
 */
#define SLUICE_IMPLEMENTATION
#include "sluice.h"

/* Logs "<device>: <n> points". */
static void log_points(const sluice_message *m, int32_t points) {
    char line[512], number[SLUICE_NUMBER_MAX];
    sluice_writer w = sluice_writer_on(line, sizeof line);
    if (m->device_len > 0)
        sluice_write_raw(&w, sluice_device(m), (int32_t)m->device_len);
    else
        sluice_write_raw(&w, SLUICE_LIT("(no device)"));
    sluice_write_raw(&w, SLUICE_LIT(": "));
    sluice_write_raw(&w, number, sluice_number_text((double)points, number));
    if (points == 1)
        sluice_write_raw(&w, SLUICE_LIT(" point"));
    else
        sluice_write_raw(&w, SLUICE_LIT(" points"));
    int32_t len = sluice_write_done(&w);
    if (len >= 0) sluice_log(SLUICE_LOG_INFO, line, len);
}

static void handle(int32_t i, const sluice_message *m) {
    sluice_json_reader r = sluice_json_read(sluice_payload(m), (int32_t)m->payload_len);
    sluice_json_field f;
    int32_t st, points = 0;
    while ((st = sluice_json_next(&r, &f)) == SLUICE_JSON_FIELD) {
        if (f.type != SLUICE_JSON_NUMBER) continue;
        char metric[256];
        int32_t len = sluice_json_unescape(f.key, f.key_len, metric, sizeof metric);
        if (len < 0) {
            sluice_fail(i, SLUICE_LIT("a field name is longer than 256 bytes"));
            return;
        }
        if (sluice_emit_point(i, metric, len, f.number, SLUICE_TIME_OF_MESSAGE) != SLUICE_OK) {
            sluice_fail(i, SLUICE_LIT("the host refused a point (a message without a device, or an empty field name)"));
            return;
        }
        points++;
    }
    /* The reader hands out fields before it has seen the whole text: points
     * of a payload that turns out malformed are discarded with the message. */
    if (st != SLUICE_JSON_END) {
        sluice_fail(i, SLUICE_LIT("payload is not a JSON object"));
        return;
    }
    log_points(m, points);
}

/* Required: handle `count` messages; return 0 (anything else fails the whole batch). */
int32_t sluice_on_batch(const sluice_message *msgs, int32_t count) {
    for (int32_t i = 0; i < count; i++) handle(i, &msgs[i]);
    return 0;
}
