/*
 * overheat — raises an `overheat` event when a device reports a temperature
 * above a threshold.
 *
 * Manifest config: {"threshold": 30.0} (the default when not configured).
 * Event: {"type":"overheat","device":"<id>","temperature":<t>,"threshold":<th>}
 *
 * Without libc, the example carries a tiny scanner that finds a top-level
 * numeric field by name; it is enough for flat telemetry objects.
 */
#define SLUICE_IMPLEMENTATION
#include "sluice.h"

static double threshold = 30.0;

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Parses a JSON number at s[0..len); returns the characters used, 0 if none. */
static int parse_number(const char *s, int len, double *out) {
    int i = 0, neg = 0, digits = 0;
    double v = 0;
    if (i < len && (s[i] == '-' || s[i] == '+')) neg = s[i++] == '-';
    while (i < len && s[i] >= '0' && s[i] <= '9') { v = v * 10 + (s[i++] - '0'); digits++; }
    if (i < len && s[i] == '.') {
        double scale = 0.1;
        for (i++; i < len && s[i] >= '0' && s[i] <= '9'; i++, scale /= 10) { v += (s[i] - '0') * scale; digits++; }
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        int eneg = 0, e = 0;
        i++;
        if (i < len && (s[i] == '-' || s[i] == '+')) eneg = s[i++] == '-';
        while (i < len && s[i] >= '0' && s[i] <= '9') e = e * 10 + (s[i++] - '0');
        while (e-- > 0) v = eneg ? v / 10 : v * 10;
    }
    if (!digits) return 0;
    *out = neg ? -v : v;
    return i;
}

/* Finds `"key"` followed by `:` and a number anywhere in the text. */
static int find_number(const char *s, int len, const char *key, double *out) {
    int klen = 0;
    while (key[klen]) klen++;
    for (int i = 0; i + klen + 2 <= len; i++) {
        if (s[i] != '"') continue;
        int j = 0;
        while (j < klen && s[i + 1 + j] == key[j]) j++;
        if (j != klen || s[i + 1 + klen] != '"') continue;
        int k = i + klen + 2;
        while (k < len && is_space(s[k])) k++;
        if (k >= len || s[k] != ':') continue;
        k++;
        while (k < len && is_space(s[k])) k++;
        if (parse_number(s + k, len - k, out)) return 1;
    }
    return 0;
}

/* Appends text; returns the new length. */
static int put(char *buf, int n, const char *s, int len) {
    for (int i = 0; i < len; i++) buf[n++] = s[i];
    return n;
}

static int put_str(char *buf, int n, const char *s) {
    while (*s) buf[n++] = *s++;
    return n;
}

/* Writes a number with three decimals (enough for a sensor reading). */
static int put_number(char *buf, int n, double v) {
    if (v < 0) { buf[n++] = '-'; v = -v; }
    long long scaled = (long long)(v * 1000.0 + 0.5);
    long long whole = scaled / 1000;
    int frac = (int)(scaled % 1000);
    char digits[24];
    int d = 0;
    do { digits[d++] = (char)('0' + whole % 10); whole /= 10; } while (whole);
    while (d) buf[n++] = digits[--d];
    buf[n++] = '.';
    buf[n++] = (char)('0' + frac / 100);
    buf[n++] = (char)('0' + frac / 10 % 10);
    buf[n++] = (char)('0' + frac % 10);
    return n;
}

SLUICE_EXPORT(sluice_init) int32_t sluice_init(const char *config, int32_t len) {
    double t;
    if (find_number(config, len, "threshold", &t)) threshold = t;
    return 0;
}

int32_t sluice_on_batch(const sluice_message *msgs, int32_t count) {
    static char event[512];
    for (int32_t i = 0; i < count; i++) {
        const sluice_message *m = &msgs[i];
        double t;
        if (!find_number(sluice_payload(m), (int)m->payload_len, "temperature", &t) || t <= threshold) continue;
        if (m->device_len > 200) {
            sluice_fail(i, "device id too long for the event buffer", 39);
            continue;
        }
        int n = put_str(event, 0, "{\"type\":\"overheat\",\"device\":\"");
        n = put(event, n, sluice_device(m), (int)m->device_len);
        n = put_str(event, n, "\",\"temperature\":");
        n = put_number(event, n, t);
        n = put_str(event, n, ",\"threshold\":");
        n = put_number(event, n, threshold);
        n = put_str(event, n, "}");
        sluice_emit_event(i, event, n, SLUICE_TIME_OF_MESSAGE);
    }
    return 0;
}
