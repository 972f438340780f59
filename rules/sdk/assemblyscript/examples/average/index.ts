// average: per-device 1-minute averages of every numeric field, kept in rule
// state; <metric>_avg_1m is emitted when a device's value opens a new minute.
import { Message, emitPoint, fail, stateGet, stateSet } from "../../assembly";
export { sluice_abi_version, sluice_alloc } from "../../assembly";

const WINDOW_MS: i64 = 60_000;
// State per metric, 24 bytes little-endian: i64 window start, f64 sum, u64 count.
const record = new Uint8Array(24);

export function sluice_on_batch(batch: usize, count: i32): i32 {
  for (let i = 0; i < count; i++) {
    const m = Message.at(batch, i);
    // Checked before any state is read: a bad payload costs nothing.
    const fields = m.jsonFields();
    if (fields == null) {
      fail(i, "payload is not a JSON object");
      continue;
    }
    const t = m.receivedAtMs;
    const window = t - (((t % WINDOW_MS) + WINDOW_MS) % WINDOW_MS);
    while (fields.next()) {
      if (fields.isNumber) add(i, fields.key(), fields.number, window);
    }
  }
  return 0;
}

function add(msg: i32, metric: string, v: f64, window: i64): void {
  const old = stateGet(msg, metric);
  let sum = v;
  let n: u64 = 1;
  if (old != null && old.length == 24) {
    const start = load<i64>(old.dataStart);
    if (start > window) return; // late data for a closed minute
    if (start == window) {
      sum += load<f64>(old.dataStart, 8);
      n += load<u64>(old.dataStart, 16);
    } else {
      const avg = load<f64>(old.dataStart, 8) / <f64>load<u64>(old.dataStart, 16);
      emitPoint(msg, metric + "_avg_1m", avg, start);
    }
  }
  store<i64>(record.dataStart, window);
  store<f64>(record.dataStart, sum, 8);
  store<u64>(record.dataStart, n, 16);
  stateSet(msg, metric, record);
}
