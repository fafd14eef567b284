// Validates the ServiceMonitor objects of the rendered manifests against the prometheus-operator
// schema from @kubernetes-models/prometheus-operator (kubernetes-validate has no schemas for
// custom resources). `cargo xtask deploy` writes it next to the node_modules that hold that
// package and runs it with the JSON validate.py wrote ({ file: [objects] }) as its argument.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const files = JSON.parse(readFileSync(process.argv[2], "utf8"));
let checked = 0;
let failed = 0;
for (const [file, objects] of Object.entries(files)) {
  for (const object of objects) {
    if (object.apiVersion !== "monitoring.coreos.com/v1" || object.kind !== "ServiceMonitor") {
      continue;
    }
    checked += 1;
    try {
      new ServiceMonitor(object).validate();
    } catch (error) {
      failed += 1;
      console.log(`ERROR ${file}: ServiceMonitor/${object.metadata.name}: ${error.message}`);
    }
  }
}
console.log(`ServiceMonitors valid against the prometheus-operator schema: ${checked - failed} of ${checked}`);
process.exit(failed === 0 ? 0 : 1);
