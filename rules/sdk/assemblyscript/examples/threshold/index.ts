// threshold: an alert event, also published on alerts/{device}, when the
// configured metric goes above the threshold.
import { Message, JsonFields, JsonWriter, emitEvent, publish, dropMessage, fail } from "../../assembly";
export { sluice_abi_version, sluice_alloc } from "../../assembly";

let metric = "temperature";
let threshold: f64 = 30;
// Reused for every alert, so a batch allocates nothing for its documents.
const doc = new JsonWriter();

export function sluice_init(ptr: usize, len: i32): i32 {
  const config = JsonFields.parse(ptr, len);
  if (config == null) return 1;
  while (config.next()) {
    if (config.keyIs("metric") && config.isString) metric = config.text();
    else if (config.keyIs("threshold") && config.isNumber) threshold = config.number;
  }
  return 0;
}

export function sluice_on_batch(batch: usize, count: i32): i32 {
  for (let i = 0; i < count; i++) {
    const m = Message.at(batch, i);
    const fields = m.jsonFields();
    if (fields == null) {
      fail(i, "payload is not a JSON object");
      continue;
    }
    let value = NaN;
    while (fields.next()) {
      if (fields.keyIs(metric)) value = fields.number; // NaN unless a number
    }
    if (!(value > threshold)) {
      dropMessage(i);
      continue;
    }
    doc.reset().field("metric", metric).field("value", value).field("threshold", threshold);
    emitEvent(i, doc);
    publish(i, "alerts/" + m.deviceId, doc, 1);
  }
  return 0;
}
