/*
 * sluice.h — write Sluice rule functions in C (ABI v1, see rules/ABI.md).
 *
 * Build a rule with clang, no libc needed:
 *   clang --target=wasm32 -nostdlib -O2 -Wl,--no-entry -I rules/sdk/c -o rule.wasm rule.c
 *
 * In exactly one source file, `#define SLUICE_IMPLEMENTATION` before including
 * this header: it then defines the exports every rule needs besides its own
 * `sluice_on_batch` (`sluice_abi_version`, and a `sluice_alloc` that keeps one
 * reusable buffer at the heap base, plus memcpy/memset fallbacks for -nostdlib).
 *
 * Besides the host functions, the header carries what most rules need and C
 * without libc lacks: a reader for the top-level fields of flat JSON objects
 * and a writer for small JSON documents (see examples/, built by
 * build-examples.sh).
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <stddef.h>
#include <stdint.h>

#define SLUICE_ABI_VERSION 1

#define SLUICE_IMPORT(name) __attribute__((import_module("sluice"), import_name(#name)))
#define SLUICE_EXPORT(name) __attribute__((export_name(#name)))

/* A time argument meaning "the message's arrival time". */
#define SLUICE_TIME_OF_MESSAGE INT64_MIN

/* Host function results. */
#define SLUICE_OK 0
#define SLUICE_BAD_MESSAGE (-1) /* message index not in this batch */
#define SLUICE_BAD_MEMORY (-2)  /* pointer/length outside memory, or not UTF-8 */
#define SLUICE_LIMIT (-3)       /* the message reached its output limit */
#define SLUICE_INVALID (-4)     /* invalid argument (event not JSON, NaN, wildcard topic...) */
#define SLUICE_NO_DEVICE (-5)   /* points and state need a device; this message has none */
#define SLUICE_NOT_FOUND (-6)   /* state_get: the key has no value */

/* Log levels. */
#define SLUICE_LOG_ERROR 0
#define SLUICE_LOG_WARN 1
#define SLUICE_LOG_INFO 2
#define SLUICE_LOG_DEBUG 3

/* One message of a batch, as laid out by the host (40 bytes, little endian). */
typedef struct {
    uint32_t topic_ptr;
    uint32_t topic_len;
    uint32_t payload_ptr;
    uint32_t payload_len;
    uint32_t device_ptr; /* device_len == 0: the message has no device */
    uint32_t device_len;
    int64_t received_at_ms; /* Unix epoch milliseconds */
    uint8_t qos;
    uint8_t retain;
    uint8_t hops; /* rule publishes that led to this message */
    uint8_t reserved[5];
} sluice_message;

_Static_assert(sizeof(sluice_message) == 40, "ABI v1 descriptors are 40 bytes");

static inline const char *sluice_topic(const sluice_message *m) { return (const char *)(uintptr_t)m->topic_ptr; }
static inline const char *sluice_payload(const sluice_message *m) { return (const char *)(uintptr_t)m->payload_ptr; }
static inline const char *sluice_device(const sluice_message *m) { return (const char *)(uintptr_t)m->device_ptr; }

SLUICE_IMPORT(emit_point)
int32_t sluice_emit_point(int32_t msg, const char *metric, int32_t metric_len, double value, int64_t time_ms);
SLUICE_IMPORT(emit_event)
int32_t sluice_emit_event(int32_t msg, const char *json, int32_t json_len, int64_t time_ms);
SLUICE_IMPORT(publish)
int32_t sluice_publish(int32_t msg, const char *topic, int32_t topic_len, const void *payload, int32_t payload_len,
                       int32_t qos, int32_t retain);
SLUICE_IMPORT(drop_message)
int32_t sluice_drop_message(int32_t msg);
SLUICE_IMPORT(fail)
int32_t sluice_fail(int32_t msg, const char *reason, int32_t reason_len);
SLUICE_IMPORT(log)
int32_t sluice_log(int32_t level, const char *text, int32_t text_len);

/* A string literal and its length, for the (pointer, length) pairs the host
 * functions take: sluice_fail(i, SLUICE_LIT("bad payload")). Literals only:
 * on a pointer, sizeof would measure the pointer. */
#define SLUICE_LIT(s) (s), (int32_t)(sizeof(s) - 1)

/* Per-device state: bytes the host keeps for this rule and the device of
 * message `msg`, under UTF-8 keys of 1 to SLUICE_STATE_KEY_MAX bytes. Writes
 * are seen by later messages of the same call and committed only if the whole
 * call succeeds; failing one message does not undo its writes, so check a
 * message before writing state for it. */
#define SLUICE_STATE_KEY_MAX 256

/* Returns the value's length. The value is copied only if it fits in buf_cap,
 * so a caller that gets a bigger length calls again with a bigger buffer.
 * SLUICE_NOT_FOUND: no value; SLUICE_NO_DEVICE; SLUICE_INVALID: key length. */
SLUICE_IMPORT(state_get)
int32_t sluice_state_get(int32_t msg, const char *key, int32_t key_len, void *buf, int32_t buf_cap);
/* SLUICE_LIMIT: the device's state for this rule would pass the rule's state
 * limit. Nothing is stored, and the host itself sends the message to the dead
 * letters naming the limit. */
SLUICE_IMPORT(state_set)
int32_t sluice_state_set(int32_t msg, const char *key, int32_t key_len, const void *value, int32_t value_len);
/* SLUICE_OK also when the key had no value. */
SLUICE_IMPORT(state_delete)
int32_t sluice_state_delete(int32_t msg, const char *key, int32_t key_len);

/* The rule's entry point: handle `count` messages starting at `msgs`; return 0. */
int32_t sluice_on_batch(const sluice_message *msgs, int32_t count);

/* ------------------------------------------------------------ reading JSON --
 * Payloads are mostly small flat telemetry objects, and there is no libc or
 * allocator here, so the reader walks the top-level fields of one object in
 * place. Keys and strings come out as pointers into the text, still escaped
 * (compare them with sluice_json_eq, decode them with sluice_json_unescape);
 * nested objects and arrays are checked and skipped, never entered.
 *
 *     sluice_json_reader r = sluice_json_read(text, len);
 *     sluice_json_field f;
 *     int32_t st;
 *     while ((st = sluice_json_next(&r, &f)) == SLUICE_JSON_FIELD) { ... }
 *     if (st == SLUICE_JSON_MALFORMED) { ... not a JSON object ... }
 *
 * The text must be exactly one JSON object (RFC 8259, strings in valid UTF-8),
 * with optional whitespace around it. Fields are handed out before the rest of
 * the text is checked: outputs of a message that then fails are discarded by
 * the host, but state writes are not, so check with sluice_json_is_object
 * before writing state. */

#define SLUICE_JSON_FIELD 1
#define SLUICE_JSON_END 0
#define SLUICE_JSON_MALFORMED (-1)

/* Field types. A number beyond the range of a double is OTHER: no point or
 * JSON document could carry it as a number. */
#define SLUICE_JSON_NUMBER 1
#define SLUICE_JSON_STRING 2
#define SLUICE_JSON_OTHER 3 /* true, false, null, an object, an array */

/* Deeper nesting is refused as malformed: the skipper keeps one bit per level
 * instead of recursing, and no telemetry comes near this. */
#define SLUICE_JSON_MAX_DEPTH 128

typedef struct {
    const char *key; /* between the quotes, escapes undecoded */
    int32_t key_len;
    int32_t type;
    double number;      /* SLUICE_JSON_NUMBER */
    const char *string; /* SLUICE_JSON_STRING: between the quotes, escapes undecoded */
    int32_t string_len;
} sluice_json_field;

typedef struct {
    const char *text;
    int32_t len;
    int32_t pos;
    int32_t state; /* SLUICE__JSON_* below */
} sluice_json_reader;

#define SLUICE__JSON_START 0
#define SLUICE__JSON_IN 1
#define SLUICE__JSON_ENDED 2
#define SLUICE__JSON_BROKEN 3

static inline int32_t sluice__json_space(const char *s, int32_t len, int32_t i) {
    while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

static inline int sluice__is_digit(char c) { return c >= '0' && c <= '9'; }

/* The four hex digits at s[i], or -1. */
static inline int32_t sluice__hex4(const char *s, int32_t len, int32_t i) {
    int32_t v = 0;
    if (len - i < 4) return -1;
    for (int32_t k = i; k < i + 4; k++) {
        char c = s[k];
        int32_t d = sluice__is_digit(c) ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Length of the UTF-8 sequence at s[i], or 0 if it is not a well-formed one
 * (overlong forms and surrogates are refused, as RFC 3629 requires). */
static inline int32_t sluice__utf8_len(const char *s, int32_t len, int32_t i) {
    const unsigned char *u = (const unsigned char *)s;
    unsigned char c = u[i], lo = 0x80, hi = 0xBF;
    int32_t n;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) n = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) n = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return 0;
    if (len - i < n || u[i + 1] < lo || u[i + 1] > hi) return 0;
    for (int32_t k = 2; k < n; k++)
        if (u[i + k] < 0x80 || u[i + k] > 0xBF) return 0;
    return n;
}

/* s[i] is an opening quote: returns the index after the closing one, or -1. */
static inline int32_t sluice__json_string(const char *s, int32_t len, int32_t i) {
    for (i++; i < len;) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"') return i + 1;
        if (c < 0x20) return -1; /* JSON wants control characters escaped */
        if (c == '\\') {
            char e = i + 1 < len ? s[i + 1] : 0;
            if (e == 'u') {
                if (sluice__hex4(s, len, i + 2) < 0) return -1;
                i += 6;
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' || e == 't') {
                i += 2;
            } else {
                return -1;
            }
        } else {
            int32_t n = sluice__utf8_len(s, len, i);
            if (n == 0) return -1;
            i += n;
        }
    }
    return -1;
}

/* 10^n for n >= 0: exact up to 1e22 (every partial product is), a few units
 * in the last place above, infinity past the double range. */
static inline double sluice__pow10(int32_t n) {
    static const double squares[] = {1e1, 1e2, 1e4, 1e8, 1e16, 1e32, 1e64, 1e128, 1e256};
    double r = 1;
    if (n > 511) return __builtin_inf();
    for (int32_t b = 0; n; b++, n >>= 1)
        if (n & 1) r *= squares[b];
    return r;
}

/* v * 10^k. Negative powers divide by the exact positive power rather than
 * multiply by an inexact 1e-k; steps of 1e300 keep the power itself finite
 * for results near the ends of the double range. */
static inline double sluice__scale10(double v, int32_t k) {
    for (; k > 300; k -= 300) v *= 1e300;
    for (; k < -300; k += 300) v /= 1e300;
    return k >= 0 ? v * sluice__pow10(k) : v / sluice__pow10(-k);
}

/* The JSON number at s[i] (strict grammar: no '+', no leading zeros, digits
 * on both sides of '.'): returns the index after it, or -1. The value is the
 * first 19 significant digits, exact in a uint64, scaled once by a power of
 * ten: within a few units in the last place, not always correctly rounded. */
static inline int32_t sluice__json_number(const char *s, int32_t len, int32_t i, double *out) {
    int neg = 0;
    uint64_t m = 0;
    int32_t sig = 0, e10 = 0;
    if (i < len && s[i] == '-') neg = 1, i++;
    if (i >= len || !sluice__is_digit(s[i])) return -1;
    if (s[i] == '0') {
        i++;
    } else {
        for (; i < len && sluice__is_digit(s[i]); i++) {
            if (sig < 19) m = m * 10 + (uint64_t)(s[i] - '0'), sig++;
            else e10++;
        }
    }
    if (i < len && s[i] == '.') {
        if (++i >= len || !sluice__is_digit(s[i])) return -1;
        for (; i < len && sluice__is_digit(s[i]); i++) {
            if (sig == 19) continue; /* below the precision of a double anyway */
            m = m * 10 + (uint64_t)(s[i] - '0');
            if (m) sig++; /* leading zeros of 0.000123 cost no precision */
            e10--;
        }
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        int eneg = 0;
        int32_t x = 0;
        if (++i < len && (s[i] == '+' || s[i] == '-')) eneg = s[i++] == '-';
        if (i >= len || !sluice__is_digit(s[i])) return -1;
        for (; i < len && sluice__is_digit(s[i]); i++)
            if (x < 100000) x = x * 10 + (s[i] - '0');
        e10 += eneg ? -x : x;
    }
    /* Past these, any 19-digit mantissa is already infinity or zero. */
    if (e10 > 400) e10 = 400;
    if (e10 < -450) e10 = -450;
    double v = m ? sluice__scale10((double)m, e10) : 0;
    *out = neg ? -v : v;
    return i;
}

/* s[i] starts `true`, `false` or `null`: returns the index after it, or -1. */
static inline int32_t sluice__json_literal(const char *s, int32_t len, int32_t i) {
    const char *word = s[i] == 't' ? "true" : s[i] == 'f' ? "false" : "null";
    for (; *word; word++, i++)
        if (i >= len || s[i] != *word) return -1;
    return i;
}

/* At s[i] a member of an object: the key, ':' and the whitespace up to the
 * value. Returns the value's index, or -1. */
static inline int32_t sluice__json_member(const char *s, int32_t len, int32_t i) {
    i = sluice__json_space(s, len, i);
    if (i >= len || s[i] != '"' || (i = sluice__json_string(s, len, i)) < 0) return -1;
    i = sluice__json_space(s, len, i);
    if (i >= len || s[i] != ':') return -1;
    return i + 1;
}

/* Checks and skips the value at s[i] (leading whitespace allowed): returns
 * the index after it, or -1. */
static inline int32_t sluice__json_value(const char *s, int32_t len, int32_t i) {
    uint32_t is_object[SLUICE_JSON_MAX_DEPTH / 32]; /* bit per open container */
    int32_t depth = 0;
    for (;;) {
        i = sluice__json_space(s, len, i);
        if (i >= len) return -1;
        char c = s[i];
        if (c == '{' || c == '[') {
            if (depth == SLUICE_JSON_MAX_DEPTH) return -1;
            uint32_t bit = 1u << (depth % 32);
            if (c == '{') is_object[depth / 32] |= bit;
            else is_object[depth / 32] &= ~bit;
            depth++;
            i = sluice__json_space(s, len, i + 1);
            if (i < len && s[i] == (c == '{' ? '}' : ']')) {
                depth--, i++;
            } else {
                if (c == '{' && (i = sluice__json_member(s, len, i)) < 0) return -1;
                continue; /* to the first element's value */
            }
        } else if (c == '"') {
            i = sluice__json_string(s, len, i);
        } else if (c == '-' || sluice__is_digit(c)) {
            double ignored;
            i = sluice__json_number(s, len, i, &ignored);
        } else if (c == 't' || c == 'f' || c == 'n') {
            i = sluice__json_literal(s, len, i);
        } else {
            return -1;
        }
        if (i < 0) return -1;
        /* After a value: close containers until one goes on with a ','. */
        for (;;) {
            if (depth == 0) return i;
            i = sluice__json_space(s, len, i);
            int object = (is_object[(depth - 1) / 32] >> ((depth - 1) % 32)) & 1;
            if (i < len && s[i] == ',') {
                if (object && (i = sluice__json_member(s, len, i + 1)) < 0) return -1;
                if (!object) i++;
                break;
            }
            if (i >= len || s[i] != (object ? '}' : ']')) return -1;
            depth--, i++;
        }
    }
}

static inline sluice_json_reader sluice_json_read(const char *text, int32_t len) {
    sluice_json_reader r = {text, len, 0, SLUICE__JSON_START};
    return r;
}

/* The next top-level field into *f: SLUICE_JSON_FIELD, then SLUICE_JSON_END
 * once the closing brace and nothing but whitespace after it are seen, or
 * SLUICE_JSON_MALFORMED. The end and malformed results repeat if called again. */
static inline int32_t sluice_json_next(sluice_json_reader *r, sluice_json_field *f) {
    const char *s = r->text;
    int32_t len = r->len, i = sluice__json_space(s, len, r->pos), k;
    if (r->state == SLUICE__JSON_ENDED) return SLUICE_JSON_END;
    if (r->state == SLUICE__JSON_BROKEN) return SLUICE_JSON_MALFORMED;
    if (r->state == SLUICE__JSON_START) {
        if (i >= len || s[i] != '{') goto malformed;
        r->state = SLUICE__JSON_IN;
        i = sluice__json_space(s, len, i + 1);
        if (i < len && s[i] == '}') goto end;
    } else {
        if (i < len && s[i] == '}') goto end;
        if (i >= len || s[i] != ',') goto malformed;
        i = sluice__json_space(s, len, i + 1);
    }
    if (i >= len || s[i] != '"') goto malformed;
    if ((k = sluice__json_string(s, len, i)) < 0) goto malformed;
    f->key = s + i + 1;
    f->key_len = k - i - 2;
    i = sluice__json_space(s, len, k);
    if (i >= len || s[i] != ':') goto malformed;
    i = sluice__json_space(s, len, i + 1);
    f->number = 0;
    f->string = 0;
    f->string_len = 0;
    if (i < len && s[i] == '"') {
        if ((k = sluice__json_string(s, len, i)) < 0) goto malformed;
        f->type = SLUICE_JSON_STRING;
        f->string = s + i + 1;
        f->string_len = k - i - 2;
    } else if (i < len && (s[i] == '-' || sluice__is_digit(s[i]))) {
        if ((k = sluice__json_number(s, len, i, &f->number)) < 0) goto malformed;
        f->type = __builtin_isfinite(f->number) ? SLUICE_JSON_NUMBER : SLUICE_JSON_OTHER;
    } else {
        if ((k = sluice__json_value(s, len, i)) < 0) goto malformed;
        f->type = SLUICE_JSON_OTHER;
    }
    r->pos = k;
    return SLUICE_JSON_FIELD;
end:
    if (sluice__json_space(s, len, i + 1) != len) goto malformed;
    r->state = SLUICE__JSON_ENDED;
    return SLUICE_JSON_END;
malformed:
    r->state = SLUICE__JSON_BROKEN;
    return SLUICE_JSON_MALFORMED;
}

/* Whether text is one well-formed JSON object: a full pass of the reader. */
static inline int sluice_json_is_object(const char *text, int32_t len) {
    sluice_json_reader r = sluice_json_read(text, len);
    sluice_json_field f;
    int32_t st;
    while ((st = sluice_json_next(&r, &f)) == SLUICE_JSON_FIELD) continue;
    return st == SLUICE_JSON_END;
}

/* Decodes the character at raw[*i] of a string body into out as 1 to 4 bytes
 * of UTF-8, and moves *i past it. Lone surrogates, which JSON allows and
 * UTF-8 cannot carry, become U+FFFD. Text the reader did not check is passed
 * through byte by byte rather than read out of bounds. */
static inline int32_t sluice__json_char(const char *raw, int32_t len, int32_t *i, char *out) {
    int32_t j = *i, cp;
    if (raw[j] != '\\' || j + 1 >= len) {
        int32_t n = sluice__utf8_len(raw, len, j);
        if (n == 0) n = 1;
        for (int32_t k = 0; k < n; k++) out[k] = raw[j + k];
        *i = j + n;
        return n;
    }
    *i = j + 2;
    switch (raw[j + 1]) {
    case 'b': out[0] = '\b'; return 1;
    case 'f': out[0] = '\f'; return 1;
    case 'n': out[0] = '\n'; return 1;
    case 'r': out[0] = '\r'; return 1;
    case 't': out[0] = '\t'; return 1;
    case 'u': break;
    default: out[0] = raw[j + 1]; return 1; /* \" \\ \/ */
    }
    if ((cp = sluice__hex4(raw, len, j + 2)) < 0) {
        out[0] = '\\';
        *i = j + 1;
        return 1;
    }
    *i = j + 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        int32_t low = j + 7 < len && raw[j + 6] == '\\' && raw[j + 7] == 'u' ? sluice__hex4(raw, len, j + 8) : -1;
        if (low >= 0xDC00 && low <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            *i = j + 12;
        } else {
            cp = 0xFFFD;
        }
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        cp = 0xFFFD;
    }
    if (cp < 0x80) return out[0] = (char)cp, 1;
    if (cp < 0x800) return out[0] = (char)(0xC0 | cp >> 6), out[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000)
        return out[0] = (char)(0xE0 | cp >> 12), out[1] = (char)(0x80 | (cp >> 6 & 0x3F)),
               out[2] = (char)(0x80 | (cp & 0x3F)), 3;
    return out[0] = (char)(0xF0 | cp >> 18), out[1] = (char)(0x80 | (cp >> 12 & 0x3F)),
           out[2] = (char)(0x80 | (cp >> 6 & 0x3F)), out[3] = (char)(0x80 | (cp & 0x3F)), 4;
}

/* Decodes a key or string from the reader into out: returns its length, or
 * -1 if that is more than cap. Decoding never lengthens the text, so
 * cap = raw_len always suffices. */
static inline int32_t sluice_json_unescape(const char *raw, int32_t raw_len, char *out, int32_t cap) {
    int32_t n = 0;
    char c[4];
    for (int32_t i = 0; i < raw_len;) {
        int32_t k = sluice__json_char(raw, raw_len, &i, c);
        if (k > cap - n) return -1;
        for (int32_t j = 0; j < k; j++) out[n++] = c[j];
    }
    return n;
}

/* Whether a key or string from the reader, decoded, is exactly text[0..len).
 * Compares while decoding, so it needs no buffer and matches "temp\u0065"
 * against "tempe". */
static inline int sluice_json_eq(const char *raw, int32_t raw_len, const char *text, int32_t len) {
    int32_t n = 0;
    char c[4];
    for (int32_t i = 0; i < raw_len;) {
        int32_t k = sluice__json_char(raw, raw_len, &i, c);
        if (k > len - n) return 0;
        for (int32_t j = 0; j < k; j++)
            if (text[n++] != c[j]) return 0;
    }
    return n == len;
}

/* ------------------------------------------------------------ writing JSON --
 * A writer appends to a caller's buffer and remembers whether a value just
 * ended, so keys and values get their commas without the caller counting.
 * Running out of room (or a number JSON cannot hold) makes every later write
 * a no-op and sluice_write_done return -1: one check at the end covers all.
 *
 *     char doc[256];
 *     sluice_writer w = sluice_writer_on(doc, sizeof doc);
 *     sluice_write_begin_object(&w);
 *     sluice_write_key(&w, SLUICE_LIT("value"));
 *     sluice_write_number(&w, 21.5);
 *     sluice_write_end_object(&w);
 *     int32_t len = sluice_write_done(&w); // {"value":21.5}
 */

typedef struct {
    char *buf;
    int32_t cap;
    int32_t len;
    int32_t comma;  /* a value just ended: the next key or value needs a ',' */
    int32_t failed; /* out of room, or a non-finite number */
} sluice_writer;

/* Room sluice_number_text needs: sign, 17 digits, point, and either the
 * zeros of 0.00000ddd or an exponent. */
#define SLUICE_NUMBER_MAX 32

static inline sluice_writer sluice_writer_on(char *buf, int32_t cap) {
    sluice_writer w = {buf, cap, 0, 0, 0};
    return w;
}

/* Bytes as they are, for text that is not JSON (a topic) or already is. */
static inline void sluice_write_raw(sluice_writer *w, const char *s, int32_t len) {
    if (w->failed || len > w->cap - w->len) {
        w->failed = 1;
        return;
    }
    for (int32_t i = 0; i < len; i++) w->buf[w->len++] = s[i];
}

static inline void sluice__write_comma(sluice_writer *w) {
    if (w->comma) sluice_write_raw(w, ",", 1);
    w->comma = 0;
}

/* A JSON string of the given UTF-8 bytes, quoted, with '"', '\\' and control
 * characters escaped. */
static inline void sluice_write_string(sluice_writer *w, const char *s, int32_t len) {
    static const char hex[] = "0123456789abcdef";
    sluice__write_comma(w);
    sluice_write_raw(w, "\"", 1);
    for (int32_t i = 0, run = 0; i <= len; i++) {
        unsigned char c = i < len ? (unsigned char)s[i] : 0;
        if (i < len && c >= 0x20 && c != '"' && c != '\\') continue;
        sluice_write_raw(w, s + run, i - run); /* copy plain bytes in runs */
        run = i + 1;
        if (i == len) break;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            sluice_write_raw(w, e, 2);
        } else {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            sluice_write_raw(w, e, 6);
        }
    }
    sluice_write_raw(w, "\"", 1);
    w->comma = 1;
}

static inline void sluice_write_key(sluice_writer *w, const char *key, int32_t len) {
    sluice_write_string(w, key, len);
    sluice_write_raw(w, ":", 1);
    w->comma = 0;
}

static inline void sluice_write_begin_object(sluice_writer *w) {
    sluice__write_comma(w);
    sluice_write_raw(w, "{", 1);
}

static inline void sluice_write_end_object(sluice_writer *w) {
    sluice_write_raw(w, "}", 1);
    w->comma = 1;
}

static inline void sluice_write_begin_array(sluice_writer *w) {
    sluice__write_comma(w);
    sluice_write_raw(w, "[", 1);
}

static inline void sluice_write_end_array(sluice_writer *w) {
    sluice_write_raw(w, "]", 1);
    w->comma = 1;
}

/* The first n (at most 17) significant digits of v > 0, rounded, into d;
 * returns the decimal exponent of the first digit. */
static inline int32_t sluice__digits(double v, int32_t n, char *d) {
    uint64_t bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    /* log10(2) times the binary exponent; the loops fix the estimate (by up
     * to 16 steps for subnormals, whose exponent field says -1023). */
    int32_t e = ((int32_t)(bits >> 52 & 0x7FF) - 1023) * 30103 / 100000;
    double lo = sluice__pow10(n - 1), hi = sluice__pow10(n);
    double x = sluice__scale10(v, n - 1 - e);
    while (x < lo) x = sluice__scale10(v, n - 1 - --e);
    while (x >= hi) x = sluice__scale10(v, n - 1 - ++e);
    if (x < lo) x = lo; /* a rounding hair under the boundary just crossed */
    uint64_t u = (uint64_t)(x + 0.5);
    if (u >= (uint64_t)hi) u /= 10, e++; /* 9.99...95 rounded up to 10 */
    for (int32_t k = n - 1; k >= 0; k--, u /= 10) d[k] = (char)('0' + u % 10);
    return e;
}

/* Digits d[0..nd) with exponent e, at out + n: plain notation where
 * JavaScript uses it (1e-7 <= |v| < 1e21), else d.ddde±x. */
static inline int32_t sluice__format(char *out, int32_t n, const char *d, int32_t nd, int32_t e) {
    while (nd > 1 && d[nd - 1] == '0') nd--;
    if (e >= 21 || e < -6) {
        char x[4];
        int32_t xn = 0, ae = e < 0 ? -e : e;
        out[n++] = d[0];
        if (nd > 1) out[n++] = '.';
        for (int32_t k = 1; k < nd; k++) out[n++] = d[k];
        out[n++] = 'e';
        if (e < 0) out[n++] = '-';
        do x[xn++] = (char)('0' + ae % 10), ae /= 10; while (ae);
        while (xn) out[n++] = x[--xn];
    } else if (e < 0) {
        out[n++] = '0';
        out[n++] = '.';
        for (int32_t k = -1; k > e; k--) out[n++] = '0';
        for (int32_t k = 0; k < nd; k++) out[n++] = d[k];
    } else {
        for (int32_t k = 0; k <= e; k++) out[n++] = k < nd ? d[k] : '0';
        if (nd > e + 1) out[n++] = '.';
        for (int32_t k = e + 1; k < nd; k++) out[n++] = d[k];
    }
    return n;
}

/* v as JSON number text in out (SLUICE_NUMBER_MAX bytes): returns its length,
 * or -1 for NaN and infinities, which JSON cannot write. 15 significant
 * digits when they read back as v, since that is how most readings were
 * written (0.1, not 0.10000000000000001); else 17, within 1e-16 of v. */
static inline int32_t sluice_number_text(double v, char *out) {
    char d[17];
    double back;
    int32_t n = 0, len;
    if (!__builtin_isfinite(v)) return -1;
    if (__builtin_signbit(v)) out[n++] = '-';
    if (v == 0) return out[n++] = '0', n;
    double a = v < 0 ? -v : v;
    len = sluice__format(out, n, d, 15, sluice__digits(a, 15, d));
    if (sluice__json_number(out, len, 0, &back) == len && back == v) return len;
    return sluice__format(out, n, d, 17, sluice__digits(a, 17, d));
}

static inline void sluice_write_number(sluice_writer *w, double v) {
    char text[SLUICE_NUMBER_MAX];
    int32_t len = sluice_number_text(v, text);
    if (len < 0) {
        w->failed = 1;
        return;
    }
    sluice__write_comma(w);
    sluice_write_raw(w, text, len);
    w->comma = 1;
}

/* The document's length, or -1 if any write failed. */
static inline int32_t sluice_write_done(const sluice_writer *w) { return w->failed ? -1 : w->len; }

#ifdef SLUICE_IMPLEMENTATION

extern unsigned char __heap_base;
static uint32_t sluice__capacity;

SLUICE_EXPORT(sluice_abi_version) int32_t sluice_abi_version(void) { return SLUICE_ABI_VERSION; }

/* The host asks for one buffer per call and never holds two at once, so a
 * single buffer at the heap base, grown on demand, is all a rule needs. */
SLUICE_EXPORT(sluice_alloc) int32_t sluice_alloc(int32_t size) {
    uint32_t base = (uint32_t)(uintptr_t)&__heap_base;
    uint32_t end = base + (uint32_t)size;
    uint32_t have = (uint32_t)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        uint32_t pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
    }
    if ((uint32_t)size > sluice__capacity) sluice__capacity = (uint32_t)size;
    return (int32_t)base;
}

/* clang turns copy and fill loops, struct copies and `= {0}` of big locals
 * into calls to memcpy, memmove and memset, which -nostdlib leaves undefined:
 * the link fails (or, with --allow-undefined, they become imports Sluice
 * refuses). Weak, so a libc linked in wins; no_builtin stops clang from
 * turning these very loops into calls to themselves. */
__attribute__((weak, no_builtin)) void *memcpy(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

__attribute__((weak, no_builtin)) void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s)
        while (n--) *d++ = *s++;
    else
        while (n--) d[n] = s[n];
    return dst;
}

__attribute__((weak, no_builtin)) void *memset(void *dst, int c, size_t n) {
    unsigned char *d = dst;
    while (n--) *d++ = (unsigned char)c;
    return dst;
}

/* Export the entry point under its ABI name. */
__attribute__((export_name("sluice_on_batch"))) int32_t sluice__on_batch(const sluice_message *msgs, int32_t count) {
    return sluice_on_batch(msgs, count);
}

#endif /* SLUICE_IMPLEMENTATION */
#endif /* SLUICE_H */
