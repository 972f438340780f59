// convert: every numeric field becomes a point, in SI units where the key's
// suffix names an imperial one (_f -> _c, _psi -> _kpa, _mph -> _kmh).
import { Message, emitPoint, fail } from "../../assembly";
export { sluice_abi_version, sluice_alloc } from "../../assembly";

export function sluice_on_batch(batch: usize, count: i32): i32 {
  for (let i = 0; i < count; i++) {
    const fields = Message.at(batch, i).jsonFields();
    if (fields == null) {
      fail(i, "payload is not a JSON object");
      continue;
    }
    while (fields.next()) {
      if (!fields.isNumber) continue;
      const key = fields.key();
      const v = fields.number;
      if (key.endsWith("_f")) emitPoint(i, base(key, "_f") + "_c", (v - 32) * 5 / 9);
      else if (key.endsWith("_psi")) emitPoint(i, base(key, "_psi") + "_kpa", v * 6.894757);
      else if (key.endsWith("_mph")) emitPoint(i, base(key, "_mph") + "_kmh", v * 1.609344);
      else emitPoint(i, key, v);
    }
  }
  return 0;
}

function base(key: string, suffix: string): string {
  return key.substring(0, key.length - suffix.length);
}
