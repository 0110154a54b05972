/* Kefu visitor widget — protocol v1, no dependencies, no build step.
 *
 * Embed with one tag:
 *   <script src="https://chat.example.com/widget.js" data-site="shop" async></script>
 * Optional attributes: data-lang="zh|en", data-skills="billing,zh", data-user-id + data-identity-hash
 * (verified visitors), data-name, data-open="true" (start with the panel open).
 *
 * Guarantees the widget keeps on top of the node's: every entry is shown once, in `seq` order (a Map keyed
 * by seq); reconnects use exponential backoff with jitter and resume from the last seen seq; what the visitor
 * types while disconnected waits in an outbox (persisted in localStorage) and is sent with its original id
 * on reconnect, so the node applies it exactly once. All user text is inserted with textContent.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__kefuWidget) return;
  window.__kefuWidget = true;

  var base = new URL(script.src, location.href);
  var wsBase = (base.protocol === "https:" ? "wss://" : "ws://") + base.host;
  var site = script.getAttribute("data-site") || "default";
  var lang = (script.getAttribute("data-lang") || navigator.language || "en").toLowerCase().indexOf("zh") === 0 ? "zh" : "en";
  var skills = (script.getAttribute("data-skills") || "").split(",").map(function (s) { return s.trim(); }).filter(Boolean);
  var storeKey = "kefu:" + site + ":";

  var T = {
    en: {
      launcher: "Chat with us", title: "Support", close: "Close chat", placeholder: "Type a message…",
      send: "Send", connecting: "Connecting…", offline: "Offline — your messages will be sent when we reconnect",
      queued: function (p, w) { return "You are number " + p + " in line" + (w ? " · about " + w : ""); },
      minutes: function (m) { return m <= 1 ? "1 minute" : m + " minutes"; },
      with: function (n) { return "You are chatting with " + n; },
      typing: function (n) { return n + " is typing…"; }, sending: "sending…", read: "Read",
      closed: "This conversation has ended.", rate: "How did we do?", comment: "Comment (optional)",
      submit: "Send rating", thanks: "Thank you for your feedback!", stars: function (n) { return n + " of 5"; },
      newChat: "Start a new conversation", greeting: "Hi! Send us a message and an agent will be with you shortly.",
      unread: function (n) { return n + " unread"; }, error: "Error"
    },
    zh: {
      launcher: "在线客服", title: "客服", close: "关闭聊天", placeholder: "输入消息…",
      send: "发送", connecting: "正在连接…", offline: "已离线——重新连接后将自动发送您的消息",
      queued: function (p, w) { return (p <= 1 ? "您是下一位" : "您前面还有 " + (p - 1) + " 位访客") + (w ? "，预计等待约 " + w : ""); },
      minutes: function (m) { return m <= 1 ? "1 分钟" : m + " 分钟"; },
      with: function (n) { return "客服 " + n + " 正在为您服务"; },
      typing: function (n) { return n + " 正在输入…"; }, sending: "发送中…", read: "已读",
      closed: "本次会话已结束。", rate: "请为本次服务评分", comment: "留言（可选）",
      submit: "提交评价", thanks: "感谢您的评价！", stars: function (n) { return n + " 星"; },
      newChat: "开始新的会话", greeting: "您好！请留言，客服将尽快为您服务。",
      unread: function (n) { return n + " 条未读"; }, error: "错误"
    }
  }[lang];

  // ------------------------------------------------------------------ state
  var state = {
    ws: null, connected: false, attempt: 0, timer: null,
    token: load("token"), conv: load("conv"), lastSeq: +(load("lastSeq") || 0),
    entries: new Map(), // seq -> entry
    outbox: JSON.parse(load("outbox") || "[]"), // [{id, text}] not yet acked
    opening: null, // id of an in-flight open
    session: 0, sentOn: {}, // outbox id -> session it was sent on
    agentName: null, agentCursor: 0, open: false, unread: 0, closed: false, rated: false,
    typingTimer: null, lastTypingSent: 0, typingOn: false, theirTypingTimer: null
  };

  function load(k) { try { return localStorage.getItem(storeKey + k); } catch (e) { return null; } }
  function save(k, v) { try { if (v === null || v === undefined) localStorage.removeItem(storeKey + k); else localStorage.setItem(storeKey + k, v); } catch (e) { /* storage disabled */ } }
  function uid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  // ------------------------------------------------------------------ DOM (Shadow DOM: host CSS cannot reach in)
  // A custom element name: page rules for `div`, `section`, … do not match the host.
  var host = document.createElement("kefu-chat");
  host.setAttribute("data-kefu-widget", "");
  host.style.cssText = "position: fixed; z-index: 2147483000; right: 0; bottom: 0; width: 0; height: 0;";
  var root = host.attachShadow({ mode: "open" });
  // The host lives in the page's tree, so page CSS reaches it (e.g. `* { all: unset !important }`).
  // For !important declarations the shadow tree's :host rule wins over the page, so reset it here; all:
  // initial also stops inherited page styles (color, font-size, visibility) from leaking in.
  var css =
    ":host{all:initial !important;display:block !important;position:fixed !important;z-index:2147483000 !important;" +
    "right:0 !important;bottom:0 !important;left:auto !important;top:auto !important;width:0 !important;height:0 !important;" +
    "margin:0 !important;padding:0 !important;border:0 !important;transform:none !important;filter:none !important;" +
    "visibility:visible !important;opacity:1 !important;contain:none !important;pointer-events:auto !important}" +
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI','PingFang SC','Microsoft YaHei',sans-serif;font-size:14px;line-height:1.4;letter-spacing:normal;text-transform:none}" +
    ".launcher{position:fixed;right:20px;bottom:20px;height:52px;min-width:52px;padding:0 18px;border-radius:26px;border:0;background:#2f6fed;color:#fff;font-weight:600;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25)}" +
    ".launcher:focus-visible,button:focus-visible,textarea:focus-visible{outline:3px solid #ffbf47;outline-offset:2px}" +
    ".badge{display:inline-block;margin-left:8px;min-width:20px;padding:0 6px;border-radius:10px;background:#e5484d;color:#fff;font-size:12px}" +
    ".panel{position:fixed;right:20px;bottom:84px;width:360px;height:min(560px,calc(100vh - 110px));display:flex;flex-direction:column;background:#fff;color:#1d2330;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.3);overflow:hidden}" +
    ".panel[hidden]{display:none}" +
    "header{display:flex;align-items:center;justify-content:space-between;padding:12px 14px;background:#1d2330;color:#fff}" +
    "header h2{margin:0;font-size:16px;font-weight:600;color:#fff}" +
    ".x{background:none;border:0;color:#fff;font-size:22px;cursor:pointer;padding:0 4px;line-height:1}" +
    ".status{padding:6px 14px;background:#eef3fe;color:#2c3e66;font-size:13px;min-height:30px}" +
    ".status.offline{background:#fff4e5;color:#8a4b00}" +
    ".log{flex:1;overflow-y:auto;padding:12px 14px;display:flex;flex-direction:column;gap:6px;background:#fafbfc}" +
    ".msg{max-width:80%;padding:8px 11px;border-radius:12px;white-space:pre-wrap;word-break:break-word}" +
    ".msg.me{align-self:flex-end;background:#2f6fed;color:#fff;border-bottom-right-radius:3px}" +
    ".msg.them{align-self:flex-start;background:#e9ebf0;color:#1d2330;border-bottom-left-radius:3px}" +
    ".msg.pending{opacity:.6}" +
    ".meta{font-size:11px;color:#6b7280;align-self:flex-end;margin-top:-3px}" +
    ".event{align-self:center;font-size:12px;color:#6b7280;font-style:italic;text-align:center}" +
    ".typing{min-height:20px;padding:0 14px;font-size:12px;color:#6b7280;font-style:italic}" +
    "form.compose{display:flex;gap:8px;padding:10px;border-top:1px solid #e3e5ea;background:#fff}" +
    "textarea{flex:1;resize:none;height:40px;padding:9px 10px;border:1px solid #c9ccd3;border-radius:8px;color:#1d2330;background:#fff}" +
    ".send{border:0;border-radius:8px;background:#2f6fed;color:#fff;padding:0 14px;font-weight:600;cursor:pointer}" +
    ".rating{padding:10px 14px;border-top:1px solid #e3e5ea;background:#fff}" +
    ".rating p{margin:0 0 6px}" +
    ".stars{display:flex;gap:4px;margin-bottom:6px}" +
    ".stars button{border:1px solid #c9ccd3;background:#fff;border-radius:6px;padding:4px 8px;cursor:pointer;font-size:16px;color:#b7791f}" +
    ".stars button[aria-pressed=true]{background:#fff4d6;border-color:#b7791f}" +
    ".rating textarea{width:100%;height:48px;margin-bottom:6px}" +
    ".link{background:none;border:0;color:#2f6fed;cursor:pointer;padding:6px 0;text-decoration:underline}" +
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}" +
    "@media (max-width:480px){.panel{right:0;bottom:0;width:100vw;height:100vh;height:100dvh;border-radius:0}" +
    ".launcher[aria-expanded=true]{display:none}}";
  var style = document.createElement("style");
  style.textContent = css;
  root.appendChild(style);

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  var launcher = el("button", { "class": "launcher", type: "button", "aria-haspopup": "dialog", "aria-expanded": "false", part: "launcher" }, T.launcher);
  var badge = el("span", { "class": "badge", hidden: "" });
  launcher.appendChild(badge);
  var panel = el("section", { "class": "panel", role: "dialog", "aria-label": T.title, hidden: "" });
  var header = el("header");
  var h2 = el("h2", null, T.title);
  var closeBtn = el("button", { "class": "x", type: "button", "aria-label": T.close }, "×");
  header.appendChild(h2);
  header.appendChild(closeBtn);
  var status = el("div", { "class": "status", role: "status", "aria-live": "polite" }, T.connecting);
  var log = el("div", { "class": "log", role: "log", "aria-live": "polite", "aria-relevant": "additions", tabindex: "0" });
  var typing = el("div", { "class": "typing", "aria-live": "polite" });
  var rating = el("div", { "class": "rating", hidden: "" });
  var form = el("form", { "class": "compose" });
  var input = el("textarea", { "aria-label": T.placeholder, placeholder: T.placeholder, rows: "1", maxlength: "4000" });
  var sendBtn = el("button", { "class": "send", type: "submit" }, T.send);
  form.appendChild(input);
  form.appendChild(sendBtn);
  [header, status, log, typing, rating, form].forEach(function (n) { panel.appendChild(n); });
  root.appendChild(panel);
  root.appendChild(launcher);
  (document.body || document.documentElement).appendChild(host);
  log.appendChild(el("div", { "class": "event" }, T.greeting));

  // ------------------------------------------------------------------ rendering
  var pendingNodes = new Map(); // outbox id -> element

  function render() {
    // Re-render the committed transcript in seq order; cheap for chat-sized logs.
    Array.prototype.slice.call(log.querySelectorAll("[data-seq],.meta")).forEach(function (n) { n.remove(); });
    var seqs = Array.from(state.entries.keys()).sort(function (a, b) { return a - b; });
    var lastMine = null;
    seqs.forEach(function (seq) {
      var e = state.entries.get(seq);
      var node;
      if (e.kind === "message") {
        var mine = e.from.role === "visitor";
        node = el("div", { "class": "msg " + (mine ? "me" : "them"), "data-seq": String(seq) }, e.text);
        if (mine) lastMine = seq;
      } else {
        var text = describeEvent(e);
        if (!text) return;
        node = el("div", { "class": "event", "data-seq": String(seq) }, text);
      }
      insertBeforePending(node);
    });
    if (lastMine !== null && state.agentCursor >= lastMine) {
      var meta = el("div", { "class": "meta" }, T.read);
      var after = log.querySelector('[data-seq="' + lastMine + '"]');
      if (after && after.nextSibling) log.insertBefore(meta, after.nextSibling); else log.appendChild(meta);
    }
    state.outbox.forEach(function (item) {
      if (!pendingNodes.has(item.id)) {
        var n = el("div", { "class": "msg me pending", "data-pending": item.id, title: T.sending }, item.text);
        pendingNodes.set(item.id, n);
      }
      log.appendChild(pendingNodes.get(item.id));
    });
    log.scrollTop = log.scrollHeight;
  }

  function insertBeforePending(node) {
    var firstPending = log.querySelector("[data-pending]");
    if (firstPending) log.insertBefore(node, firstPending); else log.appendChild(node);
  }

  function describeEvent(e) {
    var ev = e.event || {};
    switch (ev.name) {
      case "assigned": return T.with(ev.agent_name || ev.agent);
      case "closed": return T.closed;
      case "rated": return "★".repeat(ev.score || 0);
      case "transferred": return "↪";
      case "opened": return "";
      default: return "";
    }
  }

  function setStatus(text, offline) {
    status.textContent = text;
    status.className = "status" + (offline ? " offline" : "");
  }

  function setUnread(n) {
    state.unread = n;
    if (n > 0) { badge.hidden = false; badge.textContent = String(n); badge.setAttribute("aria-label", T.unread(n)); }
    else { badge.hidden = true; badge.textContent = ""; }
  }

  function addEntry(entry) {
    if (state.entries.has(entry.seq)) return false; // shown already: never twice
    state.entries.set(entry.seq, entry);
    if (entry.seq > state.lastSeq) { state.lastSeq = entry.seq; save("lastSeq", String(entry.seq)); }
    if (entry.kind === "event" && entry.event) {
      if (entry.event.name === "assigned") { state.agentName = entry.event.agent_name || entry.event.agent; setStatus(T.with(state.agentName)); }
      if (entry.event.name === "closed") showRating();
      if (entry.event.name === "rated") state.rated = true;
    }
    if (entry.kind === "message" && entry.from.role !== "visitor" && !(state.open && document.visibilityState === "visible")) {
      setUnread(state.unread + 1);
    }
    return true;
  }

  // ------------------------------------------------------------------ connection
  function connect() {
    clearTimeout(state.timer);
    setStatus(state.attempt ? T.offline : T.connecting, state.attempt > 0);
    var ws;
    try { ws = new WebSocket(wsBase + "/ws/visitor"); } catch (e) { return scheduleReconnect(); }
    state.ws = ws;
    ws.onopen = function () {
      var hello = { type: "hello", v: 1 };
      if (state.token) hello.token = state.token;
      var uidAttr = script.getAttribute("data-user-id");
      if (uidAttr) { hello.user_id = uidAttr; hello.identity_hash = script.getAttribute("data-identity-hash") || ""; }
      var name = script.getAttribute("data-name");
      if (name) hello.name = name;
      if (state.conv) hello.resume = [{ conv: state.conv, last_seq: state.entries.size ? state.lastSeq : 0 }];
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = function (ev) {
      var f;
      try { f = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(f);
    };
    ws.onclose = function () {
      state.connected = false;
      if (state.ws === ws) scheduleReconnect();
    };
    ws.onerror = function () { /* onclose follows */ };
  }

  function scheduleReconnect(afterMs) {
    state.connected = false;
    setStatus(T.offline, true);
    state.attempt += 1;
    // Exponential backoff with full jitter, capped at 30 s.
    var cap = Math.min(30000, 500 * Math.pow(2, Math.min(state.attempt, 6)));
    var delay = afterMs !== undefined ? afterMs + Math.random() * 500 : cap / 2 + Math.random() * cap / 2;
    clearTimeout(state.timer);
    state.timer = setTimeout(connect, delay);
  }

  function send(f) {
    if (state.ws && state.ws.readyState === 1 && state.connected) { state.ws.send(JSON.stringify(f)); return true; }
    return false;
  }

  function onFrame(f) {
    switch (f.type) {
      case "welcome":
        state.connected = true;
        state.session += 1;
        state.opening = null;
        state.attempt = 0;
        if (f.token) { state.token = f.token; save("token", f.token); }
        var open = f.conversations && f.conversations[0];
        if (open) {
          if (state.conv !== open.id) {
            state.conv = open.id; save("conv", open.id);
            state.entries = new Map(); state.lastSeq = 0;
            send({ type: "resume", conv: open.id, last_seq: 0 });
          }
          applySummary(open);
        } else if (state.conv && !state.closed) {
          // Our conversation is no longer open (closed while away): keep the transcript, allow rating.
          send({ type: "resume", conv: state.conv, last_seq: state.lastSeq });
        }
        if (!open && !state.conv) setStatus(T.greeting);
        flushOutbox();
        break;
      case "ack":
        if (f.id === state.opening && f.conv) {
          state.opening = null; state.conv = f.conv; state.closed = false; save("conv", f.conv);
          flushOutbox();
        } else {
          var i = state.outbox.findIndex(function (o) { return o.id === f.id; });
          if (i >= 0) {
            var item = state.outbox.splice(i, 1)[0];
            save("outbox", JSON.stringify(state.outbox));
            var node = pendingNodes.get(item.id);
            if (node) node.remove();
            pendingNodes.delete(item.id);
            if (f.seq) addEntry({ seq: f.seq, id: item.id, kind: "message", text: item.text, from: { role: "visitor", id: "me" }, ts: Date.now() });
          }
        }
        render();
        break;
      case "msg":
        if (f.conv === state.conv && addEntry(f.entry)) render();
        markRead();
        break;
      case "replay":
        if (f.conv !== state.conv) break;
        f.entries.forEach(addEntry);
        render();
        markRead();
        break;
      case "conversation":
        if (f.conv.id === state.conv) applySummary(f.conv);
        break;
      case "queue":
        if (f.conv === state.conv) {
          var w = f.estimated_wait_ms ? T.minutes(Math.max(1, Math.round(f.estimated_wait_ms / 60000))) : "";
          setStatus(T.queued(f.position, w));
        }
        break;
      case "typing":
        if (f.conv !== state.conv || f.from.role === "visitor") break;
        clearTimeout(state.theirTypingTimer);
        typing.textContent = f.on ? T.typing(f.from.name || f.from.id) : "";
        if (f.on) state.theirTypingTimer = setTimeout(function () { typing.textContent = ""; }, f.ttl_ms || 5000);
        break;
      case "read":
        if (f.conv === state.conv && f.by.role === "agent" && f.seq > state.agentCursor) { state.agentCursor = f.seq; render(); }
        break;
      case "reconnect":
        state.ws.onclose = null;
        state.connected = false;
        try { state.ws.close(); } catch (e) { /* closing anyway */ }
        scheduleReconnect(f.retry_after_ms || 500);
        break;
      case "error":
        onError(f);
        break;
    }
  }

  function applySummary(s) {
    state.closed = s.state === "closed";
    if (s.agent_name) state.agentName = s.agent_name;
    Object.keys(s.cursors || {}).forEach(function (k) {
      if (k.indexOf("agent:") === 0 && s.cursors[k] > state.agentCursor) state.agentCursor = s.cursors[k];
    });
    if (s.state === "assigned" && state.agentName) setStatus(T.with(state.agentName));
    if (s.state === "closed") showRating();
    render();
  }

  function onError(f) {
    if (f.code === "unauthorized" || f.code === "token_expired") {
      // Our visitor token is no good: start afresh as a new visitor.
      state.token = null; save("token", null);
      state.conv = null; save("conv", null);
      return;
    }
    if (f.code === "reload") {
      // Gap too large to replay: fetch the full history over REST, then carry on live.
      fetchHistory(f.conv);
      return;
    }
    if (f.code === "conflict" && state.outbox.some(function (o) { return o.id === f.id; })) {
      // The conversation closed under us: drop the message from the outbox and start a new one on next send.
      state.outbox = state.outbox.filter(function (o) { return o.id !== f.id; });
      save("outbox", JSON.stringify(state.outbox));
      var n = pendingNodes.get(f.id); if (n) n.remove(); pendingNodes.delete(f.id);
      state.closed = true;
      return;
    }
    if (f.code === "rate_limited") return;
    if (f.id && state.outbox.some(function (o) { return o.id === f.id; })) {
      state.outbox = state.outbox.filter(function (o) { return o.id !== f.id; });
      save("outbox", JSON.stringify(state.outbox));
      var p = pendingNodes.get(f.id); if (p) p.remove(); pendingNodes.delete(f.id);
      log.appendChild(el("div", { "class": "event", role: "alert" }, T.error + ": " + f.message));
    }
  }

  function fetchHistory(conv) {
    var url = base.origin + "/api/conversations/" + encodeURIComponent(conv) + "/entries?limit=1000&after=" + state.lastSeq;
    fetch(url, { headers: { Authorization: "Bearer " + state.token } })
      .then(function (r) { return r.json(); })
      .then(function (body) {
        (body.entries || []).forEach(addEntry);
        render();
        send({ type: "resume", conv: conv, last_seq: state.lastSeq });
      })
      .catch(function () { /* retried on the next reconnect */ });
  }

  function flushOutbox() {
    if (!state.connected || !state.outbox.length) return;
    if (!state.conv || state.closed) {
      if (!state.opening) {
        state.opening = uid();
        state.entries = new Map(); state.lastSeq = 0; state.closed = false; state.rated = false;
        rating.hidden = true; form.hidden = false;
        send({ type: "open", id: state.opening, skills: skills });
      }
      return;
    }
    // Each item goes out once per connection; after a reconnect it is sent again with the same id and the
    // node acks the retry with the original seq.
    state.outbox.forEach(function (o) {
      if (state.sentOn[o.id] === state.session) return;
      if (send({ type: "send", id: o.id, conv: state.conv, text: o.text })) state.sentOn[o.id] = state.session;
    });
  }

  function markRead() {
    if (!state.open || document.visibilityState !== "visible" || !state.conv) return;
    setUnread(0);
    var lastTheirs = 0;
    state.entries.forEach(function (e, seq) { if (seq > lastTheirs) lastTheirs = seq; });
    if (lastTheirs > (state.readSent || 0)) { state.readSent = lastTheirs; send({ type: "read", conv: state.conv, seq: lastTheirs }); }
  }

  // ------------------------------------------------------------------ rating
  function showRating() {
    if (state.rated || !rating.hidden) return;
    form.hidden = true;
    rating.hidden = false;
    rating.textContent = "";
    var p = el("p", { id: "kefu-rate-label" }, T.rate);
    var stars = el("div", { "class": "stars", role: "group", "aria-labelledby": "kefu-rate-label" });
    var chosen = 0;
    for (var i = 1; i <= 5; i++) {
      (function (n) {
        var b = el("button", { type: "button", "aria-label": T.stars(n), "aria-pressed": "false", "data-score": String(n) }, "★");
        b.onclick = function () {
          chosen = n;
          Array.prototype.forEach.call(stars.children, function (c, j) { c.setAttribute("aria-pressed", String(j < n)); });
        };
        stars.appendChild(b);
      })(i);
    }
    var comment = el("textarea", { "aria-label": T.comment, placeholder: T.comment, maxlength: "1000" });
    var submit = el("button", { "class": "send", type: "button" }, T.submit);
    submit.onclick = function () {
      if (!chosen || !state.conv) return;
      var f = { type: "rate", id: uid(), conv: state.conv, score: chosen };
      if (comment.value.trim()) f.comment = comment.value.trim();
      if (send(f)) { state.rated = true; rating.textContent = ""; rating.appendChild(el("p", null, T.thanks)); rating.appendChild(newChatButton()); }
    };
    [p, stars, comment, submit, newChatButton()].forEach(function (n) { rating.appendChild(n); });
  }

  function newChatButton() {
    var b = el("button", { "class": "link", type: "button" }, T.newChat);
    b.onclick = function () { rating.hidden = true; form.hidden = false; state.closed = true; input.focus(); };
    return b;
  }

  // ------------------------------------------------------------------ input
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = input.value.trim();
    if (!text) return;
    input.value = "";
    stopTyping();
    state.outbox.push({ id: uid(), text: text });
    save("outbox", JSON.stringify(state.outbox));
    render();
    flushOutbox();
  });
  input.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); form.requestSubmit ? form.requestSubmit() : form.dispatchEvent(new Event("submit")); }
  });
  input.addEventListener("input", function () {
    if (!state.conv || state.closed) return;
    var now = Date.now();
    if (!state.typingOn || now - state.lastTypingSent > 2000) {
      state.typingOn = true; state.lastTypingSent = now;
      send({ type: "typing", conv: state.conv, on: true });
    }
    clearTimeout(state.typingTimer);
    state.typingTimer = setTimeout(stopTyping, 3000);
  });
  function stopTyping() {
    clearTimeout(state.typingTimer);
    if (state.typingOn && state.conv) send({ type: "typing", conv: state.conv, on: false });
    state.typingOn = false;
  }

  function setOpen(open) {
    state.open = open;
    panel.hidden = !open;
    launcher.setAttribute("aria-expanded", String(open));
    if (open) { input.focus(); markRead(); log.scrollTop = log.scrollHeight; } else { launcher.focus(); }
  }
  launcher.addEventListener("click", function () { setOpen(!state.open); });
  closeBtn.addEventListener("click", function () { setOpen(false); });
  panel.addEventListener("keydown", function (ev) { if (ev.key === "Escape") setOpen(false); });
  document.addEventListener("visibilitychange", markRead);

  render();
  connect();
  if (script.getAttribute("data-open") === "true") setOpen(true);
})();
