/* Kefu agent console — protocol v1 over /ws/agent plus the REST API; no dependencies, no build step.
 * Every entry is keyed by seq (shown once, in order); all user text is inserted with textContent. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/agent";
  var S = {
    token: null, me: null, ws: null, connected: false, attempt: 0, timer: null,
    convs: new Map(), // id -> {summary, entries: Map(seq->entry), minLoaded, visitorCursor}
    offers: new Map(), // id -> {summary, expiresAt}
    queue: [], agents: [], canned: [], selected: null,
    pending: new Map(), // frame id -> {conv, text}
    typingOn: false, typingSentAt: 0, typingTimer: null, theirTyping: null, audio: null, queueTimer: null
  };
  var BASE_TITLE = "Kefu console";

  function uid() { return (window.crypto && crypto.randomUUID) ? crypto.randomUUID() : Date.now().toString(36) + Math.random().toString(36).slice(2); }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function ago(ms) {
    var s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + "s";
    var m = Math.floor(s / 60);
    return m < 60 ? m + "m " + (s % 60) + "s" : Math.floor(m / 60) + "h " + (m % 60) + "m";
  }
  function api(path, opts) {
    opts = opts || {};
    opts.headers = Object.assign({ Authorization: "Bearer " + S.token }, opts.headers || {});
    return fetch(path, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (body) {
        if (!r.ok) throw new Error(body.code || ("http " + r.status));
        return body;
      });
    });
  }

  // ------------------------------------------------------------------ sign in
  function signIn(token) {
    S.token = token;
    try { sessionStorage.setItem("kefu-agent-token", token); } catch (e) { /* storage disabled */ }
    $("signin-error").textContent = "";
    connect();
  }
  function signOut(message) {
    S.token = null;
    try { sessionStorage.removeItem("kefu-agent-token"); } catch (e) { /* storage disabled */ }
    if (S.ws) { S.ws.onclose = null; S.ws.close(); }
    clearTimeout(S.timer);
    clearInterval(S.queueTimer);
    $("app").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = message || "";
  }
  $("signin-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    unlockAudio();
    signIn($("token-input").value.trim());
  });
  $("signout").addEventListener("click", function () { signOut(""); });

  // ------------------------------------------------------------------ connection
  function connect() {
    clearTimeout(S.timer);
    setConn(S.attempt ? "reconnecting…" : "connecting…");
    var ws = new WebSocket(wsUrl);
    S.ws = ws;
    ws.onopen = function () {
      var resume = [];
      S.convs.forEach(function (c, id) {
        var last = 0;
        c.entries.forEach(function (_, seq) { if (seq > last) last = seq; });
        if (last) resume.push({ conv: id, last_seq: last });
      });
      ws.send(JSON.stringify({ type: "hello", v: 1, token: S.token, resume: resume }));
    };
    ws.onmessage = function (ev) { var f; try { f = JSON.parse(ev.data); } catch (e) { return; } onFrame(f); };
    ws.onclose = function () { S.connected = false; if (S.ws === ws && S.token) scheduleReconnect(); };
  }
  function scheduleReconnect(afterMs) {
    S.connected = false;
    S.attempt += 1;
    var cap = Math.min(30000, 500 * Math.pow(2, Math.min(S.attempt, 6)));
    var delay = afterMs !== undefined ? afterMs + Math.random() * 500 : cap / 2 + Math.random() * cap / 2;
    setConn("offline — reconnecting in " + Math.round(delay / 1000) + "s");
    S.timer = setTimeout(connect, delay);
  }
  function send(f) {
    if (S.ws && S.ws.readyState === 1 && S.connected) { S.ws.send(JSON.stringify(f)); return true; }
    return false;
  }
  function setConn(text) { $("conn").textContent = text; }

  function onFrame(f) {
    switch (f.type) {
      case "welcome":
        S.connected = true;
        S.attempt = 0;
        S.me = f.id;
        $("signin").hidden = true;
        $("app").hidden = false;
        $("me").textContent = f.id;
        setConn("connected");
        f.conversations.forEach(function (s) {
          var c = upsert(s);
          if (!c.entries.size) loadHistory(s.id, s.last_seq + 1);
        });
        refreshAgents(); refreshCanned(); refreshQueue();
        clearInterval(S.queueTimer);
        S.queueTimer = setInterval(function () { refreshQueue(); renderOffers(); }, 3000);
        // Re-send what was not acked before a disconnect: same ids, applied once.
        S.pending.forEach(function (p, id) { send({ type: "send", id: id, conv: p.conv, text: p.text }); });
        renderAll();
        break;
      case "offer":
        S.offers.set(f.conv.id, { summary: f.conv, expiresAt: Date.now() + f.expires_in_ms });
        renderOffers();
        refreshQueue();
        notify();
        break;
      case "offer_withdrawn":
        S.offers.delete(f.conv);
        renderOffers();
        break;
      case "conversation":
        upsert(f.conv);
        refreshQueue();
        if (f.conv.state === "assigned" && f.conv.agent === S.me) {
          S.offers.delete(f.conv.id);
          if (!S.selected) select(f.conv.id);
          var c = S.convs.get(f.conv.id);
          if (c && !c.entries.size) loadHistory(f.conv.id, f.conv.last_seq + 1);
        }
        renderAll();
        break;
      case "msg":
        addEntries(f.conv, [f.entry], true);
        break;
      case "replay":
        addEntries(f.conv, f.entries, false);
        break;
      case "ack":
        var p = S.pending.get(f.id);
        if (p) {
          S.pending.delete(f.id);
          if (f.seq) addEntries(p.conv, [{ seq: f.seq, id: f.id, kind: "message", text: p.text, from: { role: "agent", id: S.me }, ts: Date.now() }], false);
          else renderConv();
        }
        break;
      case "typing":
        if (f.conv === S.selected && f.from.role === "visitor") {
          clearTimeout(S.theirTyping);
          $("typing").textContent = f.on ? (f.from.name || "Visitor") + " is typing…" : "";
          if (f.on) S.theirTyping = setTimeout(function () { $("typing").textContent = ""; }, f.ttl_ms || 5000);
        }
        break;
      case "read":
        var rc = S.convs.get(f.conv);
        if (rc && f.by.role === "visitor") { rc.visitorCursor = Math.max(rc.visitorCursor || 0, f.seq); if (f.conv === S.selected) renderConv(); }
        break;
      case "presence":
        refreshAgents();
        break;
      case "reconnect":
        S.ws.onclose = null;
        try { S.ws.close(); } catch (e) { /* closing anyway */ }
        scheduleReconnect(f.retry_after_ms || 500);
        break;
      case "error":
        if (f.code === "unauthorized" || f.code === "token_expired") { signOut(f.code === "token_expired" ? "Token expired." : "Invalid token."); return; }
        if (f.id && S.pending.has(f.id)) S.pending.delete(f.id);
        if (f.code === "reload" && f.conv) { loadHistory(f.conv, (f.last_seq || 0) + 1); return; }
        toast(f.code + ": " + f.message);
        break;
    }
  }

  // ------------------------------------------------------------------ model
  function upsert(summary) {
    var c = S.convs.get(summary.id);
    if (!c) { c = { summary: summary, entries: new Map(), minLoaded: null, visitorCursor: 0 }; S.convs.set(summary.id, c); }
    c.summary = summary;
    var vc = summary.cursors && summary.cursors["visitor:" + summary.visitor];
    if (vc) c.visitorCursor = Math.max(c.visitorCursor, vc);
    return c;
  }
  function ensure(id) {
    return S.convs.get(id) || upsert({ id: id, state: "assigned", visitor: "?", skills: [], last_seq: 0, created_ms: Date.now(), cursors: {} });
  }
  function myCursor(c) { return (c.summary.cursors && c.summary.cursors["agent:" + S.me]) || 0; }
  function unreadOf(c) {
    var cur = myCursor(c), n = 0;
    c.entries.forEach(function (e, seq) { if (seq > cur && e.kind === "message" && e.from.role === "visitor") n++; });
    return n;
  }
  function addEntries(conv, entries, live) {
    var c = ensure(conv);
    var fresh = false;
    entries.forEach(function (e) {
      if (c.entries.has(e.seq)) return; // never twice
      c.entries.set(e.seq, e);
      if (c.minLoaded === null || e.seq < c.minLoaded) c.minLoaded = e.seq;
      if (e.kind === "message" && e.from.role === "visitor") fresh = true;
      if (e.seq > c.summary.last_seq) c.summary.last_seq = e.seq;
    });
    if (fresh && live && (conv !== S.selected || document.visibilityState !== "visible")) notify();
    if (conv === S.selected) { renderConv(); markRead(); }
    renderMine();
    updateTitle();
  }
  function loadHistory(conv, before) {
    return api("/api/conversations/" + encodeURIComponent(conv) + "/entries?limit=50&before=" + before).then(function (body) {
      var c = ensure(conv);
      (body.entries || []).forEach(function (e) {
        if (!c.entries.has(e.seq)) c.entries.set(e.seq, e);
        if (c.minLoaded === null || e.seq < c.minLoaded) c.minLoaded = e.seq;
      });
      if (!body.entries || !body.entries.length) c.minLoaded = 1;
      if (conv === S.selected) renderConv();
      renderMine();
    }).catch(function (e) { toast("history: " + e.message); });
  }
  function markRead() {
    var c = S.convs.get(S.selected);
    if (!c || document.visibilityState !== "visible") return;
    var last = 0;
    c.entries.forEach(function (_, seq) { if (seq > last) last = seq; });
    if (last > myCursor(c) && c.summary.agent === S.me) {
      c.summary.cursors = c.summary.cursors || {};
      c.summary.cursors["agent:" + S.me] = last;
      send({ type: "read", conv: S.selected, seq: last });
      renderMine();
      updateTitle();
    }
  }
  document.addEventListener("visibilitychange", markRead);

  // ------------------------------------------------------------------ REST refreshes
  function refreshAgents() {
    api("/api/agents").then(function (b) {
      S.agents = b.agents || [];
      var me = S.agents.find(function (a) { return a.id === S.me; });
      if (me) { $("me").textContent = me.name + " (" + me.id + ")"; $("presence").value = me.status === "away" ? "away" : "online"; }
      var sel = $("transfer-agent");
      clear(sel);
      sel.appendChild(el("option", { value: "" }, "agent…"));
      S.agents.filter(function (a) { return a.id !== S.me && a.status === "online"; }).forEach(function (a) {
        sel.appendChild(el("option", { value: a.id }, a.name + " (" + a.assigned.length + "/" + a.capacity + ")"));
      });
    }).catch(function () { /* shown on next refresh */ });
  }
  function refreshCanned() {
    api("/api/canned").then(function (b) { S.canned = b.canned || []; renderCanned(); }).catch(function () { /* optional */ });
  }
  function refreshQueue() {
    api("/api/conversations?state=queued&limit=100").then(function (b) {
      S.queue = (b.conversations || []).sort(function (a, c) { return (a.queued_ms || a.created_ms) - (c.queued_ms || c.created_ms); });
      renderQueue();
    }).catch(function () { /* retried */ });
  }

  // ------------------------------------------------------------------ rendering
  function renderAll() { renderOffers(); renderMine(); renderQueue(); renderConv(); updateTitle(); }

  function renderOffers() {
    var ul = $("offers");
    clear(ul);
    S.offers.forEach(function (o, id) {
      var li = el("li", { "data-conv": id });
      var left = el("div");
      left.appendChild(el("div", null, o.summary.visitor_name || o.summary.visitor));
      left.appendChild(el("div", { "class": "sub" }, (o.summary.skills || []).join(", ") + " · " + Math.max(0, Math.round((o.expiresAt - Date.now()) / 1000)) + "s left"));
      var acc = el("button", { type: "button", "data-action": "accept" }, "Accept");
      acc.onclick = function () { send({ type: "accept", id: uid(), conv: id }); };
      var dec = el("button", { type: "button", "class": "ghost", "data-action": "decline" }, "Decline");
      dec.onclick = function () { send({ type: "decline", id: uid(), conv: id }); S.offers.delete(id); renderOffers(); };
      li.appendChild(left); li.appendChild(acc); li.appendChild(dec);
      ul.appendChild(li);
    });
  }

  function renderMine() {
    var ul = $("mine");
    clear(ul);
    S.convs.forEach(function (c, id) {
      if (c.summary.agent !== S.me && id !== S.selected) return;
      var li = el("li", { "data-conv": id, tabindex: "0", role: "button", "aria-current": String(id === S.selected) });
      var left = el("div");
      left.appendChild(el("div", null, c.summary.visitor_name || c.summary.visitor));
      left.appendChild(el("div", { "class": "sub" }, c.summary.state));
      li.appendChild(left);
      var n = unreadOf(c);
      if (n > 0) li.appendChild(el("span", { "class": "unread", "aria-label": n + " unread" }, n));
      li.onclick = function () { select(id); };
      li.onkeydown = function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(id); } };
      ul.appendChild(li);
    });
  }

  function renderQueue() {
    var ul = $("queue");
    clear(ul);
    $("queue-count").textContent = S.queue.length ? "(" + S.queue.length + ")" : "";
    S.queue.forEach(function (q) {
      var li = el("li", { "data-conv": q.id });
      var left = el("div");
      left.appendChild(el("div", null, q.visitor_name || q.visitor));
      left.appendChild(el("div", { "class": "sub" }, "waiting " + ago(q.queued_ms || q.created_ms) + ((q.skills || []).length ? " · " + q.skills.join(", ") : "")));
      li.appendChild(left);
      ul.appendChild(li);
    });
  }

  function select(id) {
    S.selected = id;
    $("typing").textContent = "";
    var c = S.convs.get(id);
    if (c && !c.entries.size) loadHistory(id, c.summary.last_seq + 1);
    renderAll();
    markRead();
    $("text").focus();
  }

  function renderConv() {
    var c = S.convs.get(S.selected);
    $("empty").hidden = !!c;
    $("conv").hidden = !c;
    if (!c) return;
    $("conv-title").textContent = c.summary.visitor_name || c.summary.visitor;
    $("conv-state").textContent = c.summary.state + ((c.summary.skills || []).length ? " · " + c.summary.skills.join(", ") : "");
    var log = $("log");
    var earlier = $("earlier");
    var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    clear(log);
    log.appendChild(earlier);
    earlier.hidden = !(c.minLoaded && c.minLoaded > 1);
    var seqs = Array.from(c.entries.keys()).sort(function (a, b) { return a - b; });
    var lastMine = 0;
    seqs.forEach(function (seq) {
      var e = c.entries.get(seq);
      if (e.kind === "message") {
        var who = e.from.role === "agent" ? "agent" : "visitor";
        if (who === "agent") lastMine = seq;
        var div = el("div", { "class": "msg " + who, "data-seq": String(seq) });
        div.appendChild(el("span", { "class": "who" }, e.from.name || e.from.id));
        div.appendChild(document.createTextNode(e.text));
        log.appendChild(div);
      } else {
        log.appendChild(el("div", { "class": "event", "data-seq": String(seq) }, describe(e.event)));
      }
    });
    if (lastMine && c.visitorCursor >= lastMine) log.appendChild(el("div", { "class": "event" }, "Seen"));
    S.pending.forEach(function (p) { if (p.conv === S.selected) log.appendChild(el("div", { "class": "msg agent pending" }, p.text)); });
    if (atBottom) log.scrollTop = log.scrollHeight;
    var mine = c.summary.agent === S.me && c.summary.state === "assigned";
    $("compose").hidden = !mine;
    $("close").disabled = !mine;
    $("transfer").disabled = !mine;
  }
  function describe(ev) {
    ev = ev || {};
    switch (ev.name) {
      case "opened": return "Conversation opened" + ((ev.skills || []).length ? " (" + ev.skills.join(", ") + ")" : "");
      case "assigned": return "Assigned to " + (ev.agent_name || ev.agent);
      case "transferred": return "Transferred from " + (ev.from_agent || "?") + " to " + (ev.to_agent || ("skill " + ev.to_skill));
      case "closed": return "Closed by " + ev.by;
      case "rated": return "Rated " + ev.score + "/5" + (ev.comment ? ": " + ev.comment : "");
      default: return ev.name || "event";
    }
  }
  $("earlier").addEventListener("click", function () {
    var c = S.convs.get(S.selected);
    if (c && c.minLoaded > 1) loadHistory(S.selected, c.minLoaded);
  });

  function renderCanned() {
    var q = $("canned-search").value.trim().toLowerCase();
    var ul = $("canned-list");
    clear(ul);
    if (!q) return;
    S.canned.filter(function (r) { return r.shortcut.toLowerCase().indexOf(q) >= 0 || r.text.toLowerCase().indexOf(q) >= 0; }).slice(0, 8).forEach(function (r) {
      var li = el("li");
      var b = el("button", { type: "button" }, "/" + r.shortcut + " — " + r.text);
      b.onclick = function () { insertText(r.text); $("canned-search").value = ""; renderCanned(); };
      li.appendChild(b);
      ul.appendChild(li);
    });
  }
  $("canned-search").addEventListener("input", renderCanned);
  function insertText(text) {
    var ta = $("text");
    var start = ta.selectionStart || ta.value.length, end = ta.selectionEnd || ta.value.length;
    ta.value = ta.value.slice(0, start) + text + ta.value.slice(end);
    ta.focus();
    ta.selectionStart = ta.selectionEnd = start + text.length;
  }

  function toast(text) {
    var log = $("log");
    if (log) { log.appendChild(el("div", { "class": "event", role: "alert" }, text)); log.scrollTop = log.scrollHeight; }
  }

  function updateTitle() {
    var total = 0;
    S.convs.forEach(function (c) { if (c.summary.agent === S.me) total += unreadOf(c); });
    total += S.offers.size;
    document.title = total > 0 ? "(" + total + ") " + BASE_TITLE : BASE_TITLE;
  }

  // Sound: a short tone through WebAudio (no asset), enabled after the first user gesture.
  function unlockAudio() {
    try { if (!S.audio && window.AudioContext) S.audio = new AudioContext(); } catch (e) { S.audio = null; }
  }
  document.addEventListener("click", unlockAudio, { once: true });
  function notify() {
    updateTitle();
    if (!S.audio) return;
    try {
      var o = S.audio.createOscillator(), g = S.audio.createGain();
      o.frequency.value = 880; g.gain.value = 0.05;
      o.connect(g); g.connect(S.audio.destination);
      o.start(); o.stop(S.audio.currentTime + 0.12);
    } catch (e) { /* audio unavailable */ }
  }

  // ------------------------------------------------------------------ actions
  $("compose").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = $("text").value.trim();
    if (!text || !S.selected) return;
    var id = uid();
    S.pending.set(id, { conv: S.selected, text: text });
    send({ type: "send", id: id, conv: S.selected, text: text });
    $("text").value = "";
    stopTyping();
    renderConv();
  });
  $("text").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("compose").requestSubmit(); }
  });
  $("text").addEventListener("input", function () {
    if (!S.selected) return;
    var now = Date.now();
    if (!S.typingOn || now - S.typingSentAt > 2000) { S.typingOn = true; S.typingSentAt = now; send({ type: "typing", conv: S.selected, on: true }); }
    clearTimeout(S.typingTimer);
    S.typingTimer = setTimeout(stopTyping, 3000);
  });
  function stopTyping() {
    clearTimeout(S.typingTimer);
    if (S.typingOn && S.selected) send({ type: "typing", conv: S.selected, on: false });
    S.typingOn = false;
  }
  $("close").addEventListener("click", function () { if (S.selected) send({ type: "close", id: uid(), conv: S.selected }); });
  $("transfer").addEventListener("click", function () {
    var agent = $("transfer-agent").value, skill = $("transfer-skill").value.trim();
    if (!S.selected || (!agent && !skill)) return;
    var f = { type: "transfer", id: uid(), conv: S.selected };
    if (agent) f.to_agent = agent; else f.to_skill = skill;
    send(f);
    $("transfer-skill").value = "";
  });
  $("presence").addEventListener("change", function () { send({ type: "presence", status: $("presence").value }); });

  // ------------------------------------------------------------------ start
  var fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", location.pathname); // keep the token out of the address bar
  var saved = null;
  try { saved = sessionStorage.getItem("kefu-agent-token"); } catch (e) { /* storage disabled */ }
  if (fromHash || saved) signIn(fromHash || saved);
})();
