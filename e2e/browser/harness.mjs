// Test harness: a real kefu-node child process and headless Debian Chromium driven by playwright-core.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, "../..");
export const BIN = process.env.KEFU_NODE_BIN || path.join(ROOT, "target/debug/kefu-node");
export const ARTIFACTS = path.join(here, "artifacts");
mkdirSync(ARTIFACTS, { recursive: true });

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

/** A node on a fixed port and data dir, so it can be restarted in place. */
export class Node {
  constructor(env = {}) {
    this.dir = mkdtempSync(path.join(tmpdir(), "kefu-browser-"));
    this.env = env;
    this.port = null;
    this.proc = null;
  }

  args() {
    return ["--data-dir", this.dir, "--listen", `127.0.0.1:${this.port || 0}`];
  }

  baseEnv() {
    return {
      ...process.env,
      KEFU_SERVER__TCP_LISTEN: "",
      KEFU_DEMO__ENABLED: "false",
      KEFU_ROUTING__OFFER_TIMEOUT_SECS: "60",
      KEFU_SERVER__SHUTDOWN_GRACE_SECS: "2",
      RUST_LOG: "warn",
      ...this.env,
    };
  }

  /** Register an agent with the CLI (node stopped) and return its token. */
  addAgent(id, name, capacity = 5) {
    return execFileSync(BIN, [...this.args(), "agent", "add", "--id", id, "--name", name, "--capacity", String(capacity), "--admin"], {
      env: this.baseEnv(),
      stdio: ["ignore", "pipe", "pipe"],
    }).toString().trim();
  }

  async start() {
    if (!this.port) this.port = await freePort();
    this.proc = spawn(BIN, [...this.args(), "serve"], { env: { ...this.baseEnv(), RUST_LOG: "info" }, stdio: ["ignore", "ignore", "pipe"] });
    const proc = this.proc;
    await new Promise((resolve, reject) => {
      let buf = "";
      const timer = setTimeout(() => reject(new Error("node did not start: " + buf)), 30000);
      proc.stderr.on("data", (d) => {
        buf += d.toString();
        if (process.env.KEFU_TEST_LOG) process.stderr.write("[node] " + d);
        if (buf.includes("kefu-node listening")) { clearTimeout(timer); resolve(); }
      });
      proc.on("exit", (code) => { clearTimeout(timer); reject(new Error(`node exited (${code}): ${buf}`)); });
    });
    proc.removeAllListeners("exit");
    return this;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Graceful stop (SIGTERM), as in a rolling upgrade. */
  async stop() {
    if (!this.proc) return;
    const proc = this.proc;
    this.proc = null;
    await new Promise((resolve) => {
      proc.on("exit", resolve);
      proc.kill("SIGTERM");
      setTimeout(() => proc.kill("SIGKILL"), 8000);
    });
  }

  kill() {
    if (this.proc) this.proc.kill("SIGKILL");
    this.proc = null;
  }
}

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

/** Fail the test on any page error or dialog (an XSS payload that runs would open one). */
export function watch(page, name, problems) {
  page.on("pageerror", (e) => problems.push(`${name} pageerror: ${e.message}`));
  page.on("dialog", (d) => { problems.push(`${name} dialog: ${d.message()}`); d.dismiss().catch(() => {}); });
}

export async function api(node, token, pathAndQuery) {
  const r = await fetch(node.url + pathAndQuery, { headers: { Authorization: "Bearer " + token } });
  return r.json();
}

/** Seqs of the transcript rows the widget / console rendered, in DOM order. */
export async function renderedSeqs(locator) {
  return locator.evaluateAll((nodes) => nodes.map((n) => Number(n.getAttribute("data-seq"))));
}
