/*
 * convert — rewrites telemetry into SI units: one point per numeric field of
 * the payload, in order, at the message's time. <base>_f becomes <base>_c,
 * <base>_psi becomes <base>_kpa, <base>_mph becomes <base>_kmh; other numeric
 * fields become points unchanged. Fields that are not numbers are skipped; a
 * payload that is not a JSON object is failed.
 */
#define SLUICE_IMPLEMENTATION
#include "sluice.h"

static double f_to_c(double v) { return (v - 32) * 5 / 9; }
static double psi_to_kpa(double v) { return v * 6.894757; }
static double mph_to_kmh(double v) { return v * 1.609344; }

static const struct {
    const char *from;
    int32_t from_len;
    const char *to;
    int32_t to_len;
    double (*convert)(double);
} units[] = {
    {SLUICE_LIT("_f"), SLUICE_LIT("_c"), f_to_c},
    {SLUICE_LIT("_psi"), SLUICE_LIT("_kpa"), psi_to_kpa},
    {SLUICE_LIT("_mph"), SLUICE_LIT("_kmh"), mph_to_kmh},
};

static int ends_with(const char *s, int32_t len, const char *suffix, int32_t suffix_len) {
    if (len < suffix_len) return 0;
    for (int32_t k = 0; k < suffix_len; k++)
        if (s[len - suffix_len + k] != suffix[k]) return 0;
    return 1;
}

static void convert(int32_t i, const sluice_message *m) {
    sluice_json_reader r = sluice_json_read(sluice_payload(m), (int32_t)m->payload_len);
    sluice_json_field f;
    int32_t st;
    while ((st = sluice_json_next(&r, &f)) == SLUICE_JSON_FIELD) {
        if (f.type != SLUICE_JSON_NUMBER) continue;
        char name[1024];
        /* Leave room for a new suffix one byte longer than the old one. */
        int32_t len = sluice_json_unescape(f.key, f.key_len, name, sizeof name - 1);
        if (len < 0) {
            sluice_fail(i, SLUICE_LIT("a field name is longer than 1 KiB"));
            return;
        }
        double value = f.number;
        for (uint32_t u = 0; u < sizeof units / sizeof units[0]; u++) {
            if (!ends_with(name, len, units[u].from, units[u].from_len)) continue;
            len -= units[u].from_len;
            for (int32_t k = 0; k < units[u].to_len; k++) name[len++] = units[u].to[k];
            value = units[u].convert(value);
            break;
        }
        if (sluice_emit_point(i, name, len, value, SLUICE_TIME_OF_MESSAGE) != SLUICE_OK) {
            sluice_fail(i, SLUICE_LIT("the host refused a point (empty name, or a value out of range)"));
            return;
        }
    }
    /* Points already emitted for a payload that turns out malformed are
     * discarded by the host along with the message. */
    if (st != SLUICE_JSON_END) sluice_fail(i, SLUICE_LIT("payload is not a JSON object"));
}

int32_t sluice_on_batch(const sluice_message *msgs, int32_t count) {
    for (int32_t i = 0; i < count; i++) convert(i, &msgs[i]);
    return 0;
}
