//! WAT shared by the engine tests and the benchmarks (which include this
//! file by path).

/// Memory, ABI version and an allocator that hands out one buffer at 64 KiB,
/// growing memory to fit: what every ABI v1 guest needs besides its
/// `sluice_on_batch`.
pub const ALLOC: &str = r#"
  (memory (export "memory") 2)
  (func (export "sluice_abi_version") (result i32) i32.const 1)
  (func (export "sluice_alloc") (param $n i32) (result i32)
    (local $pages i32)
    (local.set $pages (i32.sub (i32.shr_u (i32.add (local.get $n) (i32.const 131071)) (i32.const 16)) (memory.size)))
    (if (i32.gt_s (local.get $pages) (i32.const 0)) (then (drop (memory.grow (local.get $pages)))))
    i32.const 65536)
"#;
