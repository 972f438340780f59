// {{name}}: a Sluice rule function (ABI v1) in AssemblyScript.
//
// Every numeric top-level field of a message's JSON payload becomes a point
// named after the field, at the message's arrival time, and each message gets
// a line in Sluice's log. A payload that is not a JSON object goes to the
// dead letters; a message with no numeric field produces nothing (it is
// counted as dropped).
//
// The SDK (@sluice/rule-sdk, vendored in sluice-rule-sdk/) documents the rest:
// publish, emitEvent, state, JsonWriter, and the optional sluice_init that
// receives the manifest's [config] table.
import { LogLevel, Message, Status, emitPoint, fail, log } from "@sluice/rule-sdk";
// Only the entry file's exports reach the module: re-export the SDK's two.
export { sluice_abi_version, sluice_alloc } from "@sluice/rule-sdk";

// Required: handle `count` messages; return 0 (anything else fails the whole batch).
export function sluice_on_batch(batch: usize, count: i32): i32 {
  for (let i = 0; i < count; i++) {
    const m = Message.at(batch, i);
    const fields = m.jsonFields();
    if (fields == null) {
      fail(i, "payload is not a JSON object");
      continue;
    }
    let points = 0;
    let refused = false;
    while (fields.next()) {
      if (!fields.isNumber) continue;
      if (emitPoint(i, fields.key(), fields.number) != Status.OK) {
        fail(i, "the host refused a point (a message without a device, or an empty field name)");
        refused = true;
        break;
      }
      points++;
    }
    if (refused) continue;
    const device = m.hasDevice ? m.deviceId : "(no device)";
    log(LogLevel.INFO, device + ": " + points.toString() + (points == 1 ? " point" : " points"));
  }
  return 0;
}
