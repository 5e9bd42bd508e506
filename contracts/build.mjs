// Compiles contracts/src/*.sol with the npm solc (wasm, pinned in package.json) and writes one JSON
// artifact per contract (ABI + creation and runtime bytecode) for Python, which never needs node at run time.
//
//   node build.mjs                 # writes ../marketplace/chain/compiled/
//   node build.mjs --out DIR       # writes DIR instead (the artifact test compiles to a temporary folder)
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const solc = require("solc");

const here = path.dirname(fileURLToPath(import.meta.url));
const srcDir = path.join(here, "src");
const nodeModules = path.join(here, "node_modules");
const CONTRACTS = ["PayoutLedger", "TestToken"];
// py-evm stops at prague; solc 0.8.3x would default to osaka and emit opcodes py-evm rejects. The optimizer
// favours run time (runs: 10000): a claim is sent once per contributor and epoch, the contracts deployed once.
const SETTINGS = {
  evmVersion: "prague",
  optimizer: { enabled: true, runs: 10000 },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function parseArgs(argv) {
  let out = path.resolve(here, "..", "marketplace", "chain", "compiled");
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out" && i + 1 < argv.length) out = path.resolve(argv[++i]);
    else throw new Error(`unknown argument ${argv[i]} (usage: node build.mjs [--out DIR])`);
  }
  return { out };
}

// Imports resolve only inside node_modules, so a source can never pull a file from elsewhere on disk.
function findImports(importPath) {
  if (!importPath.startsWith("@openzeppelin/")) return { error: `import outside @openzeppelin: ${importPath}` };
  const resolved = path.resolve(nodeModules, importPath);
  if (!resolved.startsWith(nodeModules + path.sep)) return { error: `import escapes node_modules: ${importPath}` };
  try {
    return { contents: fs.readFileSync(resolved, "utf8") };
  } catch (err) {
    return { error: `cannot read ${importPath}: ${err.message} (run npm ci in contracts/)` };
  }
}

function compile() {
  const sources = {};
  for (const name of CONTRACTS) {
    sources[`src/${name}.sol`] = { content: fs.readFileSync(path.join(srcDir, `${name}.sol`), "utf8") };
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const problems = output.errors || [];
  for (const problem of problems) process.stderr.write(problem.formattedMessage || problem.message);
  if (problems.some((p) => p.severity === "error")) throw new Error("compilation failed");
  return output;
}

function main() {
  const { out } = parseArgs(process.argv.slice(2));
  const output = compile();
  fs.mkdirSync(out, { recursive: true });
  for (const name of CONTRACTS) {
    const unit = output.contracts[`src/${name}.sol`][name];
    const artifact = {
      contractName: name,
      source: `contracts/src/${name}.sol`,
      compiler: { solc: solc.version(), evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer },
      abi: unit.abi,
      bytecode: `0x${unit.evm.bytecode.object}`,
      deployedBytecode: `0x${unit.evm.deployedBytecode.object}`,
    };
    fs.writeFileSync(path.join(out, `${name}.json`), `${JSON.stringify(artifact, null, 2)}\n`);
  }
  process.stdout.write(`compiled ${CONTRACTS.join(", ")} with solc ${solc.version()} -> ${out}\n`);
}

try {
  main();
} catch (err) {
  process.stderr.write(`build.mjs: ${err.message}\n`);
  process.exit(1);
}
