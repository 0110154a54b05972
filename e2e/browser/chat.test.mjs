// The widget and the agent console in headless Chromium against a real kefu-node.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import http from "node:http";
import { Node, launch, watch, api, renderedSeqs, freePort, ARTIFACTS } from "./harness.mjs";

let browser;
before(async () => { browser = await launch(); });
after(async () => { await browser?.close(); });

async function visitorPage(node, problems, url = node.url + "/") {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  watch(page, "visitor", problems);
  await page.goto(url);
  const w = page.locator("[data-kefu-widget]");
  return { ctx, page, w };
}

async function consolePage(node, token, problems) {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  watch(page, "console", problems);
  await page.goto(node.url + "/agent#token=" + encodeURIComponent(token));
  await page.locator("#conn", { hasText: "connected" }).waitFor();
  return { ctx, page };
}

async function widgetSend(w, text) {
  await w.locator("textarea").first().fill(text);
  await w.locator("textarea").first().press("Enter");
}

async function consoleSend(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

test("visitor and agent chat both ways; typing indicator appears and clears", async () => {
  const node = new Node();
  const token = node.addAgent("alice", "Alice");
  await node.start();
  const problems = [];
  try {
    const v = await visitorPage(node, problems);
    await v.w.locator("button.launcher").click();
    await widgetSend(v.w, "Hello, where is my order?");
    const a = await consolePage(node, token, problems);
    await a.page.locator("#offers button[data-action=accept]").click();
    await a.page.locator("#log .msg.visitor", { hasText: "Hello, where is my order?" }).waitFor();

    // agent types: the widget shows the indicator, then it clears when the agent sends
    await a.page.locator("#text").pressSequentially("Let me", { delay: 20 });
    await v.w.locator(".typing", { hasText: "is typing" }).waitFor();
    await a.page.locator("#text").pressSequentially(" check.", { delay: 10 });
    await a.page.press("#text", "Enter");
    await v.w.locator(".msg.them", { hasText: "Let me check." }).waitFor();
    await v.w.locator(".typing", { hasText: /^$/ }).waitFor({ timeout: 7000 });

    // visitor types: the console shows it
    await v.w.locator("textarea").first().pressSequentially("It was", { delay: 20 });
    await a.page.locator("#typing", { hasText: "is typing" }).waitFor();
    await v.w.locator("textarea").first().pressSequentially(" order 42", { delay: 10 });
    await v.w.locator("textarea").first().press("Enter");
    await a.page.locator("#log .msg.visitor", { hasText: "It was order 42" }).waitFor();
    await a.page.locator("#typing", { hasText: /^$/ }).waitFor({ timeout: 7000 });

    // read receipt reaches the visitor ("Read" under their last message)
    await v.w.locator(".meta", { hasText: "Read" }).waitFor();
    await v.page.screenshot({ path: path.join(ARTIFACTS, "widget.png") });
    await a.page.screenshot({ path: path.join(ARTIFACTS, "console.png") });

    // agent closes: the widget offers a rating, which reaches the log
    await a.page.click("#close");
    await v.w.locator(".rating button[data-score='4']").click();
    await v.w.locator(".rating button", { hasText: /Send rating/ }).click();
    await v.w.locator(".rating", { hasText: "Thank you" }).waitFor();
    await a.page.locator("#log .event", { hasText: "Rated 4/5" }).waitFor();
    assert.deepEqual(problems, []);
  } finally {
    await node.stop();
  }
});

test("node restart mid-conversation: both sides reconnect and resume, offline message delivered once", async () => {
  const node = new Node();
  const token = node.addAgent("alice", "Alice");
  await node.start();
  const problems = [];
  try {
    const v = await visitorPage(node, problems);
    await v.w.locator("button.launcher").click();
    await widgetSend(v.w, "first");
    const a = await consolePage(node, token, problems);
    await a.page.locator("#offers button[data-action=accept]").click();
    await a.page.locator("#log .msg.visitor", { hasText: "first" }).waitFor();
    await consoleSend(a.page, "second");
    await v.w.locator(".msg.them", { hasText: "second" }).waitFor();

    await node.stop(); // graceful: clients get `reconnect`
    await v.w.locator(".status.offline").waitFor();
    await widgetSend(v.w, "typed while offline");
    await v.w.locator(".msg.pending", { hasText: "typed while offline" }).waitFor();
    await node.start(); // same port, same data

    await a.page.locator("#log .msg.visitor", { hasText: "typed while offline" }).waitFor({ timeout: 30000 });
    await v.w.locator(".msg.me:not(.pending)", { hasText: "typed while offline" }).waitFor({ timeout: 30000 });
    await consoleSend(a.page, "third");
    await v.w.locator(".msg.them", { hasText: "third" }).waitFor({ timeout: 15000 });
    // let any late duplicate arrive before counting
    await v.page.waitForTimeout(1500);

    for (const [name, rows] of [["widget", v.w.locator(".log [data-seq]")], ["console", a.page.locator("#log [data-seq]")]]) {
      const seqs = await renderedSeqs(rows);
      assert.equal(new Set(seqs).size, seqs.length, `${name}: no duplicate seq in ${seqs}`);
      assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), `${name}: in order`);
    }
    const consoleSeqs = await renderedSeqs(a.page.locator("#log [data-seq]"));
    const max = Math.max(...consoleSeqs);
    assert.deepEqual(consoleSeqs, Array.from({ length: max }, (_, i) => i + 1), "console: no gap");
    assert.equal(await v.w.locator(".msg", { hasText: "typed while offline" }).count(), 1);
    assert.equal(await a.page.locator("#log .msg", { hasText: "typed while offline" }).count(), 1);
    // and the log on the node agrees: exactly once
    const convs = await api(node, token, "/api/conversations?state=assigned");
    const entries = await api(node, token, `/api/conversations/${convs.conversations[0].id}/entries`);
    const texts = entries.entries.filter((e) => e.kind === "message").map((e) => e.text);
    assert.deepEqual(texts, ["first", "second", "typed while offline", "third"]);
    assert.deepEqual(problems, []);
  } finally {
    await node.stop();
  }
});

test("an XSS payload from a visitor shows as literal text in the console and runs nothing", async () => {
  const node = new Node();
  const token = node.addAgent("alice", "Alice");
  await node.start();
  const problems = [];
  try {
    const v = await visitorPage(node, problems);
    await v.w.locator("button.launcher").click();
    const payloads = ['<img src=x onerror="window.__xss=1;alert(1)">', "<script>window.__xss=2;alert(2)</script>", "<b>bold?</b> & &amp;"];
    const a = await consolePage(node, token, problems);
    await widgetSend(v.w, payloads[0]);
    await a.page.locator("#offers button[data-action=accept]").click();
    for (const p of payloads.slice(1)) await widgetSend(v.w, p);
    for (const p of payloads) await a.page.locator("#log .msg.visitor", { hasText: p }).waitFor();
    assert.equal(await a.page.locator("#log img").count(), 0);
    assert.equal(await a.page.locator("#log script").count(), 0);
    assert.equal(await a.page.locator("#log b").count(), 0);
    assert.equal(await a.page.evaluate(() => window.__xss), undefined);
    // and back: the agent's markup is text in the widget too
    await consoleSend(a.page, payloads[0]);
    await v.w.locator(".msg.them", { hasText: payloads[0] }).waitFor();
    assert.equal(await v.w.locator(".log img").count(), 0);
    assert.equal(await v.page.evaluate(() => window.__xss), undefined);
    assert.deepEqual(problems, []);
  } finally {
    await node.stop();
  }
});

test("a host page with aggressive global CSS does not break the widget; zh texts; phone viewport", async () => {
  // The host page is a real site on another origin (another port), so the Origin allowlist is exercised.
  const shopPort = await freePort();
  const shopOrigin = `http://127.0.0.1:${shopPort}`;
  const node = new Node({ KEFU_SERVER__ALLOWED_ORIGINS: JSON.stringify([shopOrigin]) });
  const token = node.addAgent("alice", "Alice");
  await node.start();
  const problems = [];
  try {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await ctx.newPage();
    watch(page, "hostile", problems);
    const hostile = `<!doctype html><html><head><style>
      * { all: unset !important; display: block !important; font-size: 40px !important; color: red !important;
          position: static !important; width: 50px !important; margin: 30px !important; }
      button { visibility: hidden !important; background: black !important; }
      div { z-index: -1 !important; transform: rotate(45deg) !important; }
      textarea { display: none !important; }
    </style></head><body><h1>Hostile shop</h1>
    <script src="${node.url}/widget.js" data-site="hostile" data-lang="zh" async></script></body></html>`;
    const shop = http.createServer((_, res) => { res.setHeader("Content-Type", "text/html"); res.end(hostile); });
    await new Promise((r) => shop.listen(shopPort, "127.0.0.1", r));
    after(() => shop.close());
    await page.goto(shopOrigin + "/shop");
    const w = page.locator("[data-kefu-widget]");
    const launcher = w.locator("button.launcher");
    await launcher.waitFor();
    assert.equal((await launcher.innerText()).trim().startsWith("在线客服"), true);
    const box = await launcher.boundingBox();
    assert.ok(box && box.height >= 44 && box.height <= 60, `launcher height ${box?.height}`);
    assert.ok(box.x + box.width <= 1280 && box.x + box.width >= 1280 - 40, `launcher at the right edge: ${JSON.stringify(box)}`);
    assert.ok(box.y + box.height >= 800 - 40, `launcher at the bottom: ${JSON.stringify(box)}`);
    assert.equal(await launcher.evaluate((b) => getComputedStyle(b).visibility), "visible");
    await launcher.click();
    const panel = w.locator("section.panel");
    const pbox = await panel.boundingBox();
    assert.ok(pbox && Math.abs(pbox.width - 360) < 2, `panel width ${pbox?.width}`);
    const input = w.locator("textarea").first();
    assert.equal(await input.isVisible(), true);
    // It works, too: a message from the hostile site (an allowed origin) reaches the agent.
    await widgetSend(w, "你好，我的订单在哪里？");
    await w.locator(".status", { hasText: "您是下一位" }).waitFor();
    const entries = async () => {
      const convs = await api(node, token, "/api/conversations?state=queued");
      return convs.conversations.length ? api(node, token, `/api/conversations/${convs.conversations[0].id}/entries`) : { entries: [] };
    };
    let texts = [];
    for (let i = 0; i < 50 && !texts.includes("你好，我的订单在哪里？"); i++) {
      texts = (await entries()).entries.map((e) => e.text);
      await page.waitForTimeout(100);
    }
    assert.ok(texts.includes("你好，我的订单在哪里？"), `stored: ${texts}`);
    await page.screenshot({ path: path.join(ARTIFACTS, "widget-hostile-css.png") });

    // Phone-sized viewport: the panel takes the whole screen.
    await page.setViewportSize({ width: 375, height: 667 });
    const phone = await panel.boundingBox();
    assert.ok(phone && phone.width >= 370 && phone.height >= 660, `phone panel ${JSON.stringify(phone)}`);
    await page.screenshot({ path: path.join(ARTIFACTS, "widget-phone.png") });
    // Keyboard: Escape closes the panel and focus returns to the launcher.
    await input.press("Escape");
    assert.equal(await panel.isVisible(), false);
    assert.deepEqual(problems, []);
    await ctx.close();
  } finally {
    await node.stop();
  }
});

test("console: canned replies, history paging, transfer to another agent, presence", async () => {
  const node = new Node({ KEFU_LIMITS__FRAMES_PER_SEC: "200", KEFU_LIMITS__BURST: "400" });
  const alice = node.addAgent("alice", "Alice");
  node.addAgent("bob", "Bob");
  await node.start();
  const problems = [];
  try {
    const r = await fetch(node.url + "/api/canned", {
      method: "POST",
      headers: { Authorization: "Bearer " + alice, "Content-Type": "application/json" },
      body: JSON.stringify({ shortcut: "refund", text: "Your refund is on its way." }),
    });
    assert.equal(r.status, 201);
    const v = await visitorPage(node, problems);
    await v.w.locator("button.launcher").click();
    for (let i = 1; i <= 60; i++) await widgetSend(v.w, `line ${i}`);
    await v.w.locator(".msg.me:not(.pending)", { hasText: "line 60" }).waitFor({ timeout: 20000 });
    const a = await consolePage(node, alice, problems);
    await a.page.locator("#offers button[data-action=accept]").click();
    await a.page.locator("#log .msg.visitor", { hasText: "line 60" }).waitFor();
    // history paging: the console loaded the newest 50, older ones on demand
    assert.equal(await a.page.locator("#log .msg.visitor", { hasText: /line 1$/ }).count(), 0);
    await a.page.click("#earlier");
    await a.page.locator("#log .msg.visitor", { hasText: /line 1$/ }).first().waitFor();
    const seqs = await renderedSeqs(a.page.locator("#log [data-seq]"));
    assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => i + 1));
    // canned reply: search, insert, send
    await a.page.fill("#canned-search", "refu");
    await a.page.locator("#canned-list button", { hasText: "refund" }).click();
    assert.equal(await a.page.inputValue("#text"), "Your refund is on its way.");
    await a.page.press("#text", "Enter");
    await v.w.locator(".msg.them", { hasText: "Your refund is on its way." }).waitFor();
    // presence away then back
    await a.page.selectOption("#presence", "away");
    let agents = await api(node, alice, "/api/agents");
    for (let i = 0; i < 20 && agents.agents.find((x) => x.id === "alice").status !== "away"; i++) {
      await a.page.waitForTimeout(100);
      agents = await api(node, alice, "/api/agents");
    }
    assert.equal(agents.agents.find((x) => x.id === "alice").status, "away");
    await a.page.selectOption("#presence", "online");
    // transfer to bob (who signs in)
    const b = await consolePage(node, (await (await fetch(node.url + "/api/agents", {
      method: "POST",
      headers: { Authorization: "Bearer " + alice, "Content-Type": "application/json" },
      body: JSON.stringify({ id: "bob", name: "Bob", capacity: 5 }),
    })).json()).token, problems);
    await a.page.reload();
    await a.page.locator("#conn", { hasText: "connected" }).waitFor();
    await a.page.locator("#transfer-agent option[value=bob]").waitFor({ state: "attached" });
    await a.page.locator("#mine li").first().click();
    await a.page.selectOption("#transfer-agent", "bob");
    await a.page.click("#transfer");
    await b.page.locator("#log .event", { hasText: "Transferred from alice to bob" }).waitFor();
    await v.w.locator(".status", { hasText: "Bob" }).waitFor();
    assert.deepEqual(problems, []);
  } finally {
    await node.stop();
  }
});
