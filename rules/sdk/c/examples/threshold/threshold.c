/*
 * threshold — alerts when a metric goes above a threshold.
 *
 * Config: {"metric": "temperature", "threshold": 30} (the defaults). When the
 * payload's <metric> field is a number above the threshold, the rule emits
 * the event {"metric":"<metric>","value":<value>,"threshold":<threshold>} and
 * publishes the same document on alerts/<device> at QoS 1. Other messages
 * are dropped; a payload that is not a JSON object is failed.
 */
#define SLUICE_IMPLEMENTATION
#include "sluice.h"

static char metric[256] = "temperature";
static int32_t metric_len = sizeof "temperature" - 1;
static double threshold = 30;

/* A config the rule cannot honour stops the instance instead of silently
 * running on defaults; the log line says why. */
static int32_t bad_config(const char *why, int32_t len) {
    sluice_log(SLUICE_LOG_ERROR, why, len);
    return 1;
}

SLUICE_EXPORT(sluice_init) int32_t sluice_init(const char *config, int32_t len) {
    sluice_json_reader r = sluice_json_read(config, len);
    sluice_json_field f;
    int32_t st;
    while ((st = sluice_json_next(&r, &f)) == SLUICE_JSON_FIELD) {
        if (sluice_json_eq(f.key, f.key_len, SLUICE_LIT("metric"))) {
            if (f.type != SLUICE_JSON_STRING) return bad_config(SLUICE_LIT("config: metric must be a string"));
            metric_len = sluice_json_unescape(f.string, f.string_len, metric, sizeof metric);
            if (metric_len < 1) return bad_config(SLUICE_LIT("config: metric must be 1 to 256 bytes long"));
        } else if (sluice_json_eq(f.key, f.key_len, SLUICE_LIT("threshold"))) {
            if (f.type != SLUICE_JSON_NUMBER) return bad_config(SLUICE_LIT("config: threshold must be a number"));
            threshold = f.number;
        }
    }
    return st == SLUICE_JSON_END ? 0 : bad_config(SLUICE_LIT("config is not a JSON object"));
}

static void check(int32_t i, const sluice_message *m) {
    sluice_json_reader r = sluice_json_read(sluice_payload(m), (int32_t)m->payload_len);
    sluice_json_field f;
    int32_t st, found = 0;
    double value = 0;
    /* Read to the end: garbage after the field still makes the payload not
     * an object. A repeated key counts as its last value, as in most parsers. */
    while ((st = sluice_json_next(&r, &f)) == SLUICE_JSON_FIELD) {
        if (sluice_json_eq(f.key, f.key_len, metric, metric_len)) {
            found = f.type == SLUICE_JSON_NUMBER;
            value = f.number;
        }
    }
    if (st != SLUICE_JSON_END) {
        sluice_fail(i, SLUICE_LIT("payload is not a JSON object"));
        return;
    }
    if (!found || value <= threshold) {
        sluice_drop_message(i);
        return;
    }

    /* Room for a metric made of escaped characters, and a long device id. */
    static char doc[2048], topic[1024];
    sluice_writer w = sluice_writer_on(doc, sizeof doc);
    sluice_write_begin_object(&w);
    sluice_write_key(&w, SLUICE_LIT("metric"));
    sluice_write_string(&w, metric, metric_len);
    sluice_write_key(&w, SLUICE_LIT("value"));
    sluice_write_number(&w, value);
    sluice_write_key(&w, SLUICE_LIT("threshold"));
    sluice_write_number(&w, threshold);
    sluice_write_end_object(&w);
    int32_t doc_len = sluice_write_done(&w);

    sluice_writer t = sluice_writer_on(topic, sizeof topic);
    sluice_write_raw(&t, SLUICE_LIT("alerts/"));
    sluice_write_raw(&t, sluice_device(m), (int32_t)m->device_len);
    int32_t topic_len = sluice_write_done(&t);

    if (doc_len < 0 || topic_len < 0) {
        sluice_fail(i, SLUICE_LIT("the alert does not fit the rule's buffers"));
    } else if (sluice_emit_event(i, doc, doc_len, SLUICE_TIME_OF_MESSAGE) != SLUICE_OK ||
               sluice_publish(i, topic, topic_len, doc, doc_len, 1, 0) != SLUICE_OK) {
        sluice_fail(i, SLUICE_LIT("the host refused the alert"));
    }
}

int32_t sluice_on_batch(const sluice_message *msgs, int32_t count) {
    for (int32_t i = 0; i < count; i++) check(i, &msgs[i]);
    return 0;
}
