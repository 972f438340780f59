//! Rule guests written in WAT for the tests, each for one behaviour.

#![allow(dead_code)]

/// Imports, memory and the two exports every ABI v1 guest needs. `sluice_alloc`
/// hands out one buffer at 64 KiB, growing memory to fit.
const PRELUDE: &str = r#"
  (import "sluice" "emit_event" (func $emit_event (param i32 i32 i32 i64) (result i32)))
  (memory (export "memory") 2)
  (func (export "sluice_abi_version") (result i32) i32.const 1)
  (func (export "sluice_alloc") (param $n i32) (result i32)
    (local $pages i32)
    (local.set $pages
      (i32.sub
        (i32.shr_u (i32.add (local.get $n) (i32.const 131071)) (i32.const 16))
        (memory.size)))
    (if (i32.gt_s (local.get $pages) (i32.const 0))
      (then (drop (memory.grow (local.get $pages)))))
    i32.const 65536)
"#;

/// Emits the event `document` (JSON) for every message.
pub fn constant_event(document: &str) -> String {
    let escaped = document.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"(module {PRELUDE}
  (data (i32.const 16) "{escaped}")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        (drop (call $emit_event (local.get $i) (i32.const 16) (i32.const {len}) (i64.const -9223372036854775808)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    i32.const 0))"#,
        len = document.len()
    )
}

/// Misbehaves on purpose, by the first byte of each payload: `l` loops
/// forever, `o` grows memory until refused and then traps (as an allocator
/// out of memory does), `t` traps; anything else gets the event `{"ok":true}`.
pub fn chaos() -> String {
    format!(
        r#"(module {PRELUDE}
  (data (i32.const 16) "{{\"ok\":true}}")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32) (local $first i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        ;; payload_ptr is at offset 8 of the 40-byte descriptor
        (local.set $first
          (i32.load8_u
            (i32.load offset=8 (i32.add (local.get $ptr) (i32.mul (local.get $i) (i32.const 40))))))
        (if (i32.eq (local.get $first) (i32.const 108)) (then (loop $forever (br $forever))))
        (if (i32.eq (local.get $first) (i32.const 111))
          (then (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable))
        (if (i32.eq (local.get $first) (i32.const 116)) (then unreachable))
        (drop (call $emit_event (local.get $i) (i32.const 16) (i32.const 11) (i64.const -9223372036854775808)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    i32.const 0))"#
    )
}

/// Counts each device's messages in rule state (key `n`, an i64) and emits
/// the running count as the point `count`. A payload starting with `b`
/// stores 1 KiB under the key `big` first, to run into a small state limit.
pub fn counter() -> String {
    format!(
        r#"(module
  (import "sluice" "emit_point" (func $emit_point (param i32 i32 i32 f64 i64) (result i32)))
  (import "sluice" "state_get" (func $state_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "sluice" "state_set" (func $state_set (param i32 i32 i32 i32 i32) (result i32)))
  {PRELUDE}
  (data (i32.const 16) "n")
  (data (i32.const 20) "count")
  (data (i32.const 32) "big")
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32) (local $n i64)
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        (if (i32.eq
              (i32.load8_u (i32.load offset=8 (i32.add (local.get $ptr) (i32.mul (local.get $i) (i32.const 40)))))
              (i32.const 98))
          (then (drop (call $state_set (local.get $i) (i32.const 32) (i32.const 3) (i32.const 1024) (i32.const 1024)))))
        ;; the value lands at 48; NOT_FOUND (-6) means 0 so far
        (local.set $n (i64.const 0))
        (if (i32.eq (call $state_get (local.get $i) (i32.const 16) (i32.const 1) (i32.const 48) (i32.const 8)) (i32.const 8))
          (then (local.set $n (i64.load (i32.const 48)))))
        (local.set $n (i64.add (local.get $n) (i64.const 1)))
        (i64.store (i32.const 48) (local.get $n))
        (drop (call $state_set (local.get $i) (i32.const 16) (i32.const 1) (i32.const 48) (i32.const 8)))
        (drop (call $emit_point (local.get $i) (i32.const 20) (i32.const 5)
          (f64.convert_i64_s (local.get $n)) (i64.const -9223372036854775808)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    i32.const 0))"#
    )
}

/// Runs `body` once per message of a batch, with `$i` the message's index.
fn per_message(body: &str) -> String {
    format!(
        r#"(module {PRELUDE}
  (func (export "sluice_on_batch") (param $ptr i32) (param $count i32) (result i32)
    (local $i i32) (local $page i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        {body}
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    i32.const 0))"#
    )
}

/// Never returns from its first message.
pub fn infinite_loop() -> String {
    per_message("(loop $forever (br $forever))")
}

/// Grows its memory a page at a time and writes every byte of each new
/// page (so the memory is really resident, not just reserved), until the
/// host refuses a growth; then traps, as an allocator out of memory does.
pub fn memory_bomb() -> String {
    per_message(
        "(loop $grow
          (local.set $page (memory.grow (i32.const 1)))
          (if (i32.eq (local.get $page) (i32.const -1)) (then unreachable))
          (memory.fill (i32.shl (local.get $page) (i32.const 16)) (i32.const 255) (i32.const 65536))
          (br $grow))",
    )
}

/// Traps on every message.
pub fn trap_always() -> String {
    per_message("unreachable")
}
