// Entry point for `import ... from "@sluice/rule-sdk"` (asc resolves a
// package to its index.ts); the SDK itself is assembly/index.ts.
export * from "./assembly/index";
