/*
 * sluice.h — write Sluice rule functions in C (ABI v1, see rules/ABI.md).
 *
 * Build a rule with clang, no libc needed:
 *   clang --target=wasm32 -nostdlib -O2 -Wl,--no-entry -I rules/sdk/c -o rule.wasm rule.c
 *
 * In exactly one source file, `#define SLUICE_IMPLEMENTATION` before including
 * this header: it then defines the exports every rule needs besides its own
 * `sluice_on_batch` (`sluice_abi_version`, and a `sluice_alloc` that keeps one
 * reusable buffer at the heap base).
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
#define SLUICE_NO_DEVICE (-5)   /* points need a device; this message has none */

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

/* The rule's entry point: handle `count` messages starting at `msgs`; return 0. */
int32_t sluice_on_batch(const sluice_message *msgs, int32_t count);

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

/* Export the entry point under its ABI name. */
__attribute__((export_name("sluice_on_batch"))) int32_t sluice__on_batch(const sluice_message *msgs, int32_t count) {
    return sluice_on_batch(msgs, count);
}

#endif /* SLUICE_IMPLEMENTATION */
#endif /* SLUICE_H */
