// qmesh console (of `qmesh dev`, or of a cluster through `qmesh console`): polls the console's JSON API and draws the pages. Plain JavaScript, no build
// step, no third-party code; charts are SVG. History for the charts is kept here, in the page.
"use strict";

(() => {
  const POLL_MS = 1500;
  const DEAD_LETTER_POLL_MS = 2000;
  const WINDOW_MS = 5 * 60 * 1000;
  const PAGES = ["overview", "queues", "subscriptions", "dead-letters", "sidecars", "transactions"];
  const TOKEN = document.querySelector('meta[name="qmesh-console-token"]').content;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    page: "overview",
    status: null,
    history: [],
    selectedQueue: null,
    selectedSubscription: null,
    deadLetters: null,
    messages: { key: null, data: null, signature: "", open: new Set() },
    confirm: null,
    purge: null,
    updates: 0,
  };

  // ---------- DOM helpers (text only: names, headers and payloads are never parsed as HTML) ----------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.setAttribute("class", value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  const $ = (selector) => document.querySelector(selector);
  const key = (item) => `${item.namespace}/${item.name}`;
  const fmtInt = (n) => (n === null || n === undefined ? "–" : String(n));
  const fmtRate = (r) => (typeof r === "number" ? r.toFixed(1) : "–");
  // An age in seconds as `qmesh get` shows it (45s, 3m12s, 2h5m, 3d4h); "–" for none.
  const fmtAge = (seconds) => {
    if (typeof seconds !== "number" || seconds < 0) return "–";
    const t = Math.floor(seconds);
    const [d, hr, m, sec] = [Math.floor(t / 86400), Math.floor((t % 86400) / 3600), Math.floor((t % 3600) / 60), t % 60];
    if (d) return `${d}d${hr}h`;
    if (hr) return `${hr}h${m}m`;
    if (m) return `${m}m${sec}s`;
    return `${sec}s`;
  };
  const fmtLimit = (l) => (l ? `${l.messages_per_second}/s (burst ${l.burst})` : "–");
  const fmtCounts = (counts) =>
    Object.entries(counts || {}).map(([name, n]) => [h("span", { class: "label-chip" }, `${name}: ${n}`), " "]);

  function fmtTime(ms) {
    if (!ms) return "–";
    const d = new Date(ms);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function numCell(col, value, text) {
    return h("td", { class: value ? "num" : "num zero", "data-col": col }, text);
  }

  // Swaps in new rows unless they are the rows shown already (a hovered or selected row stays put).
  const shownRows = new WeakMap();
  function replaceRows(tbody, rows) {
    const html = rows.map((row) => row.outerHTML).join("");
    if (shownRows.get(tbody) === html) return;
    shownRows.set(tbody, html);
    tbody.replaceChildren(...rows);
  }

  // ---------- the JSON API ----------

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  async function postJSON(path, data) {
    const response = await fetch(path, {
      method: "POST",
      headers: {
        Accept: "application/json",
        "Content-Type": "application/json",
        "X-Qmesh-Console-Token": TOKEN,
      },
      body: JSON.stringify(data),
    });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function queuePath(namespace, name, what) {
    return `/api/queues/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}/${what}`;
  }

  function setLive(ok, text) {
    const live = $("#live");
    live.classList.toggle("ok", ok);
    live.classList.toggle("down", !ok);
    $("#live-text").textContent = text;
  }

  // ---------- polling ----------

  async function pollStatus() {
    try {
      const status = await getJSON("/api/status");
      applyStatus(status);
      setLive(true, `live · ${new Date(status.time_ms).toLocaleTimeString()}`);
    } catch (error) {
      setLive(false, `disconnected: ${error.message}`);
    } finally {
      setTimeout(pollStatus, POLL_MS);
    }
  }

  async function pollDeadLetters() {
    if (state.page === "dead-letters") {
      await refreshDeadLetters();
    }
    setTimeout(pollDeadLetters, DEAD_LETTER_POLL_MS);
  }

  async function refreshDeadLetters() {
    try {
      state.deadLetters = await getJSON("/api/dead-letters");
      renderDeadLetterQueues();
      if (state.messages.key) await loadMessages(state.messages.key, false);
    } catch (error) {
      setLive(false, `dead letters: ${error.message}`);
    }
  }

  function applyStatus(status) {
    state.status = status;
    const sample = { t: status.time_ms, totals: status.totals, queues: new Map(), subscriptions: new Map() };
    for (const q of status.queues) sample.queues.set(key(q), { backlog: q.backlog, publish_rate: q.publish_rate });
    for (const s of status.subscriptions) {
      sample.subscriptions.set(key(s), {
        backlog: s.backlog,
        in_flight: s.in_flight,
        ack_rate: s.ack_rate,
        deliver_rate: s.deliver_rate,
      });
    }
    state.history.push(sample);
    const oldest = status.time_ms - WINDOW_MS;
    while (state.history.length && state.history[0].t < oldest) state.history.shift();

    document.body.classList.toggle("ns-hidden", status.namespaces.length <= 1);
    const waiting = status.totals.dead_letters_waiting;
    const pill = $("#nav-dead-letters");
    pill.textContent = String(waiting);
    pill.classList.toggle("hidden", !waiting);
    render();
    state.updates += 1;
    document.body.dataset.updates = String(state.updates);
  }

  // ---------- charts ----------

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= value) return m * exp;
    return 10 * exp;
  }

  function fmtAxis(v) {
    if (v >= 1e6) return `${Number((v / 1e6).toFixed(2))}M`;
    if (v >= 1e4) return `${Number((v / 1e3).toFixed(1))}k`;
    return String(Number(v.toFixed(2)));
  }

  // The time the charts span: the history kept so far, at least a minute, at most WINDOW_MS.
  function span() {
    if (!state.history.length) return 60 * 1000;
    const kept = state.history[state.history.length - 1].t - state.history[0].t;
    return Math.min(WINDOW_MS, Math.max(60 * 1000, kept));
  }

  function fmtAgo(ms) {
    if (ms === 0) return "now";
    const s = Math.round(ms / 1000);
    return s % 60 === 0 ? `-${s / 60}m` : s > 60 ? `-${(s / 60).toFixed(1)}m` : `-${s}s`;
  }

  // series: [{name, cls, points: [[t, v]], format}]
  function lineChart(container, series) {
    if (!container) return;
    const width = Math.max(container.clientWidth || 600, 200);
    const height = 190;
    const pad = { left: 46, right: 12, top: 10, bottom: 22 };
    const now = state.status ? state.status.time_ms : Date.now();
    const spanMs = span();
    const from = now - spanMs;
    const max = niceMax(Math.max(0, ...series.flatMap((s) => s.points.map((p) => p[1]))));
    const x = (t) => pad.left + ((t - from) / spanMs) * (width - pad.left - pad.right);
    const y = (v) => pad.top + (1 - v / max) * (height - pad.top - pad.bottom);
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      root.append(svg("line", { class: "grid-line", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }));
      root.append(svg("text", { class: "axis-label", x: pad.left - 6, y: y(v) + 3, "text-anchor": "end" }, fmtAxis(v)));
    }
    for (let i = 5; i >= 0; i--) {
      const ago = (spanMs * i) / 5;
      root.append(
        svg(
          "text",
          { class: "axis-label", x: x(now - ago), y: height - 6, "text-anchor": i === 0 ? "end" : i === 5 ? "start" : "middle" },
          fmtAgo(ago),
        ),
      );
    }
    for (const s of series) {
      const pts = s.points.filter((p) => p[0] >= from);
      if (!pts.length) continue;
      const line = pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
      const base = y(0).toFixed(1);
      const area = `${x(pts[0][0]).toFixed(1)},${base} ${line} ${x(pts[pts.length - 1][0]).toFixed(1)},${base}`;
      root.append(svg("polygon", { class: `area ${s.cls}`, points: area }));
      root.append(svg("polyline", { class: `series ${s.cls}`, points: line }));
    }
    const legend = h(
      "div",
      { class: "legend" },
      series.map((s) => {
        const last = s.points.length ? s.points[s.points.length - 1][1] : null;
        return h("span", {}, h("i", { class: s.cls }), `${s.name}: ${last === null ? "–" : s.format(last)}`);
      }),
    );
    container.replaceChildren(legend, root);
  }

  function sparkline(points) {
    const width = 110;
    const height = 24;
    const el = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}` });
    if (points.length < 2) return el;
    const now = state.status.time_ms;
    const spanMs = span();
    const from = now - spanMs;
    const max = niceMax(Math.max(0, ...points.map((p) => p[1])));
    const line = points
      .map((p) => `${(((p[0] - from) / spanMs) * width).toFixed(1)},${(2 + (1 - p[1] / max) * (height - 4)).toFixed(1)}`)
      .join(" ");
    el.append(svg("polyline", { class: "series c0", points: line }));
    return el;
  }

  function historyOf(kind, itemKey, field) {
    const points = [];
    for (const sample of state.history) {
      const row = sample[kind].get(itemKey);
      if (row) points.push([sample.t, row[field]]);
    }
    return points;
  }

  function totalsHistory(field) {
    return state.history.map((sample) => [sample.t, sample.totals[field]]);
  }

  // ---------- pages ----------

  function render() {
    if (!state.status) return;
    if (state.page === "overview") renderOverview();
    else if (state.page === "queues") renderQueues();
    else if (state.page === "subscriptions") renderSubscriptions();
    else if (state.page === "dead-letters") renderDeadLetterPageFromStatus();
    else if (state.page === "sidecars") renderSidecars();
    else if (state.page === "transactions") renderTransactions();
  }

  function renderOverview() {
    const totals = state.status.totals;
    const show = (stat, text) => {
      document.querySelector(`.card[data-stat="${stat}"] .value`).textContent = text;
    };
    show("publish_rate", fmtRate(totals.publish_rate));
    show("deliver_rate", fmtRate(totals.deliver_rate));
    show("ack_rate", fmtRate(totals.ack_rate));
    show("backlog", fmtInt(totals.backlog));
    show("in_flight", fmtInt(totals.in_flight));
    show("dead_letters_waiting", fmtInt(totals.dead_letters_waiting));
    show("sidecars_up", `${totals.sidecars_up} / ${totals.sidecars}`);
    $(".card[data-stat=dead_letters_waiting]").classList.toggle("alarm", totals.dead_letters_waiting > 0);
    $("#dead-lettered-total").textContent = `waiting · ${totals.dead_lettered_total} dead-lettered in all`;
    $("#sidecars-total").textContent = `connected of ${totals.sidecars} known`;

    lineChart($("#chart-rates"), [
      { name: "publish", cls: "c0", points: totalsHistory("publish_rate"), format: fmtRate },
      { name: "deliver", cls: "c2", points: totalsHistory("deliver_rate"), format: fmtRate },
      { name: "ack", cls: "c1", points: totalsHistory("ack_rate"), format: fmtRate },
    ]);
    lineChart($("#chart-backlog"), [
      { name: "backlog", cls: "c0", points: totalsHistory("backlog"), format: fmtInt },
      { name: "in flight", cls: "c3", points: totalsHistory("in_flight"), format: fmtInt },
      { name: "dead letters", cls: "c4", points: totalsHistory("dead_letters_waiting"), format: fmtInt },
    ]);

    const busiest = [...state.status.queues].sort((a, b) => b.backlog - a.backlog || b.publish_rate - a.publish_rate).slice(0, 8);
    replaceRows(
      $("#overview-queues tbody"),
      busiest.map((q) =>
        h(
          "tr",
          { "data-key": key(q) },
          h("td", { "data-col": "name" }, h("a", { href: "#/queues", onclick: () => (state.selectedQueue = key(q)) }, q.name)),
          numCell("backlog", q.backlog, fmtInt(q.backlog)),
          numCell("publish_rate", q.publish_rate, fmtRate(q.publish_rate)),
          numCell("subscriptions", q.subscriptions, fmtInt(q.subscriptions)),
          h("td", {}, sparkline(historyOf("queues", key(q), "backlog"))),
        ),
      ),
    );
  }

  function renderQueues() {
    const queues = state.status.queues;
    $("#queues-empty").classList.toggle("hidden", queues.length > 0);
    if (!queues.some((q) => key(q) === state.selectedQueue)) state.selectedQueue = queues.length ? key(queues[0]) : null;
    replaceRows(
      $("#queues-table tbody"),
      queues.map((q) =>
        h(
          "tr",
          {
            "data-key": key(q),
            class: key(q) === state.selectedQueue ? "selected" : null,
            onclick: () => {
              state.selectedQueue = key(q);
              renderQueues();
            },
          },
          h("td", { class: "ns-col muted", "data-col": "namespace" }, q.namespace),
          h("td", { "data-col": "name" }, h("b", {}, q.name), q.dead_letter_for.length ? h("span", { class: "muted" }, " (dead-letter queue)") : null),
          numCell("publishers", q.publishers, fmtInt(q.publishers)),
          numCell("subscriptions", q.subscriptions, fmtInt(q.subscriptions)),
          numCell("backlog", q.backlog, fmtInt(q.backlog)),
          numCell("half_messages", q.half_messages, fmtInt(q.half_messages)),
          numCell("published_total", q.published_total, fmtInt(q.published_total)),
          numCell("publish_rate", q.publish_rate, fmtRate(q.publish_rate)),
          numCell("oldest_age", q.oldest_age_seconds, fmtAge(q.oldest_age_seconds)),
          h("td", { "data-col": "publish_rate_limit" }, fmtLimit(q.publish_rate_limit)),
          h("td", { "data-col": "dead_letter_queue" }, q.dead_letter_queue || h("span", { class: "muted" }, "-")),
          h("td", {}, sparkline(historyOf("queues", key(q), "backlog"))),
        ),
      ),
    );
    const selected = state.selectedQueue;
    $("#queue-detail").classList.toggle("hidden", !selected);
    if (!selected) return;
    $("#queue-detail-title").textContent = `Queue ${selected}`;
    lineChart($("#chart-queue-backlog"), [{ name: "backlog", cls: "c0", points: historyOf("queues", selected, "backlog"), format: fmtInt }]);
    lineChart($("#chart-queue-rate"), [
      { name: "publish", cls: "c0", points: historyOf("queues", selected, "publish_rate"), format: fmtRate },
    ]);
  }

  function renderSubscriptions() {
    const subs = state.status.subscriptions;
    $("#subscriptions-empty").classList.toggle("hidden", subs.length > 0);
    if (!subs.some((s) => key(s) === state.selectedSubscription)) state.selectedSubscription = subs.length ? key(subs[0]) : null;
    replaceRows(
      $("#subscriptions-table tbody"),
      subs.map((s) =>
        h(
          "tr",
          {
            "data-key": key(s),
            class: key(s) === state.selectedSubscription ? "selected" : null,
            onclick: () => {
              state.selectedSubscription = key(s);
              renderSubscriptions();
            },
          },
          h("td", { class: "ns-col muted", "data-col": "namespace" }, s.namespace),
          h("td", { "data-col": "name" }, h("b", {}, s.name)),
          h("td", { "data-col": "queue" }, s.queue),
          h("td", { "data-col": "mode" }, s.mode),
          numCell("consumers", s.consumers, fmtInt(s.consumers)),
          numCell("backlog", s.backlog, fmtInt(s.backlog)),
          numCell("scheduled", s.scheduled, fmtInt(s.scheduled)),
          numCell("in_flight", s.in_flight, fmtInt(s.in_flight)),
          numCell("acked_total", s.acked_total, fmtInt(s.acked_total)),
          numCell("deliver_rate", s.deliver_rate, fmtRate(s.deliver_rate)),
          numCell("ack_rate", s.ack_rate, fmtRate(s.ack_rate)),
          numCell("nacked_total", s.nacked_total, fmtInt(s.nacked_total)),
          numCell("oldest_age", s.oldest_age_seconds, fmtAge(s.oldest_age_seconds)),
          h("td", { "data-col": "rate_limit" }, fmtLimit(s.rate_limit)),
          h("td", { class: s.dead_lettered_total ? "num hot" : "num zero", "data-col": "dead_lettered_total" }, fmtInt(s.dead_lettered_total)),
          h("td", {}, sparkline(historyOf("subscriptions", key(s), "backlog"))),
        ),
      ),
    );
    const selected = state.selectedSubscription;
    $("#subscription-detail").classList.toggle("hidden", !selected);
    if (!selected) return;
    $("#subscription-detail-title").textContent = `Subscription ${selected}`;
    lineChart($("#chart-sub-backlog"), [
      { name: "backlog", cls: "c0", points: historyOf("subscriptions", selected, "backlog"), format: fmtInt },
      { name: "in flight", cls: "c3", points: historyOf("subscriptions", selected, "in_flight"), format: fmtInt },
    ]);
    lineChart($("#chart-sub-rates"), [
      { name: "deliver", cls: "c2", points: historyOf("subscriptions", selected, "deliver_rate"), format: fmtRate },
      { name: "ack", cls: "c1", points: historyOf("subscriptions", selected, "ack_rate"), format: fmtRate },
    ]);
  }

  function renderSidecars() {
    const sidecars = state.status.sidecars;
    $("#sidecars-empty").classList.toggle("hidden", sidecars.length > 0);
    replaceRows(
      $("#sidecars-table tbody"),
      sidecars.map((s) =>
        h(
          "tr",
          { "data-key": key(s) },
          h("td", { class: "ns-col muted", "data-col": "namespace" }, s.namespace),
          h("td", { "data-col": "name" }, h("b", {}, s.name)),
          h("td", { class: "mono", "data-col": "peer_address" }, s.peer_address),
          h(
            "td",
            { "data-col": "labels" },
            Object.entries(s.labels).map(([k, v]) => [h("span", { class: "label-chip" }, `${k}=${v}`), " "]),
          ),
          h("td", { "data-col": "owns" }, fmtCounts(s.owns)),
          h("td", { "data-col": "consumes" }, fmtCounts(s.consumes)),
          h(
            "td",
            { "data-col": "connected" },
            h("span", { class: s.connected ? "badge yes" : "badge no" }, s.connected ? "connected" : "disconnected"),
          ),
        ),
      ),
    );
  }

  function renderTransactions() {
    const events = state.status.transactions;
    $("#transactions-empty").classList.toggle("hidden", events.length > 0);
    replaceRows(
      $("#transactions-table tbody"),
      events.map((t) =>
        h(
          "tr",
          { "data-key": `${t.namespace}/${t.transaction}` },
          h("td", { class: "ns-col muted", "data-col": "namespace" }, t.namespace),
          h("td", { class: "mono", "data-col": "transaction" }, t.transaction),
          h(
            "td",
            { "data-col": "outcome" },
            h("span", { class: t.outcome === "committed" ? "badge yes" : "badge no" }, t.outcome),
          ),
          h("td", { "data-col": "decided_by" }, t.decided_by),
          numCell("messages", t.messages, fmtInt(t.messages)),
          numCell("checks", t.checks, fmtInt(t.checks)),
          h("td", { "data-col": "queues" }, t.queues.join(", ")),
          h("td", { "data-col": "sidecar" }, t.sidecar),
          h("td", { class: "muted", "data-col": "at" }, t.at || "-"),
        ),
      ),
    );
  }

  // ---------- dead letters ----------

  function renderDeadLetterPageFromStatus() {
    // The queue picker for parked messages follows the manifests.
    const select = $("#parked-queue");
    const wanted = state.status.queues.map(key);
    const have = [...select.options].map((o) => o.value);
    if (wanted.join("\n") !== have.join("\n")) {
      const current = select.value;
      select.replaceChildren(...wanted.map((k) => h("option", { value: k }, k)));
      if (wanted.includes(current)) select.value = current;
    }
  }

  function sidecarSummary(sidecars) {
    const failed = sidecars.filter((s) => s.error);
    const asked = sidecars.length - failed.length;
    const parts = [`${asked} of ${sidecars.length} asked`];
    for (const f of failed) parts.push(`${f.name}: ${f.error}`);
    return parts.join(" · ");
  }

  function renderDeadLetterQueues() {
    const rows = state.deadLetters ? state.deadLetters.dead_letter_queues : [];
    $("#dlq-empty").classList.toggle("hidden", rows.length > 0);
    replaceRows(
      $("#dlq-table tbody"),
      rows.map((d) =>
        h(
          "tr",
          { "data-key": key(d) },
          h("td", { class: "ns-col muted", "data-col": "namespace" }, d.namespace),
          h("td", { "data-col": "name" }, h("b", {}, d.name), d.declared ? null : h("span", { class: "muted" }, " (not declared)")),
          h("td", { "data-col": "dead_letter_for" }, d.dead_letter_for.join(", ")),
          h("td", { class: d.held ? "num hot" : "num zero", "data-col": "held" }, fmtInt(d.held)),
          numCell("backlog", d.backlog, fmtInt(d.backlog)),
          h("td", { class: "muted", "data-col": "sidecars" }, sidecarSummary(d.sidecars)),
          h(
            "td",
            { class: "actions" },
            h("button", { type: "button", class: "small secondary", "data-action": "peek", onclick: () => loadMessages(key(d), true) }, "Peek"),
            h(
              "button",
              {
                type: "button",
                class: "small danger",
                "data-action": "redrive",
                disabled: d.held ? null : true,
                onclick: () => openConfirm(d.namespace, d.name, d.held, d.dead_letter_for),
              },
              "Redrive…",
            ),
          ),
        ),
      ),
    );
  }

  function splitKey(k) {
    const i = k.indexOf("/");
    return [k.slice(0, i), k.slice(i + 1)];
  }

  async function loadMessages(k, fresh) {
    const [namespace, name] = splitKey(k);
    if (fresh) {
      state.messages = { key: k, data: null, signature: "", open: new Set() };
      $("#redrive-result").classList.add("hidden");
    }
    try {
      const data = await getJSON(`${queuePath(namespace, name, "messages")}?max=100`);
      if (state.messages.key !== k) return;
      const signature = JSON.stringify([data.total, data.messages, data.sidecars]);
      if (!fresh && signature === state.messages.signature) return;
      state.messages.data = data;
      state.messages.signature = signature;
      renderMessages();
    } catch (error) {
      showResult(`Peek of ${k} failed: ${error.message}`, true);
    }
  }

  function renderMessages() {
    const { key: k, data } = state.messages;
    $("#messages-panel").classList.toggle("hidden", !k);
    if (!k || !data) return;
    const isDlq = data.dead_letter_for.length > 0;
    $("#messages-title").textContent = isDlq ? `Dead letters in ${k}` : `Messages held for ${k}`;
    $("#messages-panel").dataset.key = k;
    $("#messages-summary").textContent =
      `${data.total} held, ${data.messages.length} shown` +
      (isDlq ? ` · dead letters of ${data.dead_letter_for.join(", ")}` : "") +
      ` · sidecars: ${sidecarSummary(data.sidecars)}`;
    $("#messages-redrive").disabled = data.total === 0;
    $("#messages-purge").disabled = data.total === 0;
    $("#messages-empty").classList.toggle("hidden", data.messages.length > 0);
    const rows = [];
    for (const m of data.messages) {
      const id = `${m.sidecar}/${m.sequence}`;
      const from = m.original_queue ? (m.original_subscription ? `${m.original_queue}/${m.original_subscription}` : m.original_queue) : "-";
      rows.push(
        h(
          "tr",
          {
            class: "msg",
            "data-id": m.id,
            onclick: () => {
              if (state.messages.open.has(id)) state.messages.open.delete(id);
              else state.messages.open.add(id);
              renderMessages();
            },
          },
          h("td", { "data-col": "sidecar" }, m.sidecar),
          h("td", { class: "mono", "data-col": "id" }, m.id),
          h("td", { class: "mono", "data-col": "original_id" }, m.original_id || "-"),
          h("td", { "data-col": "from" }, from),
          h("td", { class: "num", "data-col": "deliveries" }, fmtInt(m.deliveries)),
          h("td", { class: "reason", "data-col": "reason" }, m.reason || "-"),
          h("td", { "data-col": "last_error" }, m.last_error || "-"),
          h("td", { class: "muted", "data-col": "published" }, fmtTime(m.publish_time_ms)),
          h("td", { class: "mono payload", "data-col": "payload" }, m.payload_preview),
        ),
      );
      if (state.messages.open.has(id)) {
        rows.push(
          h(
            "tr",
            { class: "msg-detail" },
            h(
              "td",
              { colspan: 9 },
              h(
                "dl",
                {},
                h("dt", {}, "sequence"),
                h("dd", {}, String(m.sequence)),
                h("dt", {}, "key"),
                h("dd", {}, m.key || "-"),
                Object.entries(m.headers).flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]),
                m.subscriptions.flatMap((s) => [
                  h("dt", {}, `subscription ${s.subscription}`),
                  h("dd", {}, `${s.state}, ${s.attempts} attempts${s.last_error ? `, last error: ${s.last_error}` : ""}`),
                ]),
              ),
              h("pre", {}, `payload (${m.payload_bytes} bytes, ${m.payload_encoding}):\n${m.payload_preview}`),
            ),
          ),
        );
      }
    }
    replaceRows($("#messages-table tbody"), rows);
  }

  function showResult(text, isError) {
    const el = $("#redrive-result");
    el.textContent = text;
    el.classList.toggle("error", !!isError);
    el.classList.remove("hidden");
  }

  function openConfirm(namespace, name, held, sources) {
    const isDlq = sources && sources.length > 0;
    state.confirm = { namespace, name };
    $("#confirm-title").textContent = isDlq ? `Redrive ${name}?` : `Redeliver parked messages of ${name}?`;
    $("#confirm-text").textContent = isDlq
      ? `Send the ${held} dead letters held for ${namespace}/${name} back to their queue. Each is published ` +
        "again under a fresh id and removed from the dead-letter queue once that publish is acknowledged; " +
        "messages a consumer holds right now are skipped."
      : `Make the ${held} messages parked in ${namespace}/${name} ready again, with a fresh delivery count.`;
    const to = $("#confirm-to");
    const queues = state.status.queues.filter((q) => q.namespace === namespace && q.name !== name);
    to.replaceChildren(
      h("option", { value: "" }, isDlq ? `their original queue (${sources.join(", ")})` : "(not applicable)"),
      ...queues.map((q) => h("option", { value: q.name }, q.name)),
    );
    to.disabled = !isDlq;
    $("#confirm-ok").disabled = false;
    $("#confirm-dialog").showModal();
  }

  async function confirmRedrive() {
    const target = state.confirm;
    if (!target) return;
    $("#confirm-ok").disabled = true;
    const to = $("#confirm-to").value;
    const k = `${target.namespace}/${target.name}`;
    try {
      const result = await postJSON(queuePath(target.namespace, target.name, "redrive"), to ? { to } : {});
      const errors = result.sidecars.filter((s) => s.error).map((s) => `${s.name}: ${s.error}`);
      const failed = result.failed.map((f) => `${f.sidecar} ${f.id}: ${f.error}`);
      showResult(
        `Redrive of ${k}: ${result.republished} republished${result.to ? ` to ${result.to}` : ""}, ` +
          `${result.unparked} parked redelivered, ${result.skipped} skipped, ${result.failed.length} failed` +
          (failed.length ? ` (${failed.join("; ")})` : "") +
          (errors.length ? ` · not asked: ${errors.join("; ")}` : ""),
        result.failed.length > 0,
      );
    } catch (error) {
      showResult(`Redrive of ${k} failed: ${error.message}`, true);
    } finally {
      state.confirm = null;
      $("#confirm-dialog").close();
    }
    state.messages.key = k;
    await refreshDeadLetters();
    await loadMessages(k, false);
  }

  function openPurge(namespace, name, held) {
    state.purge = { namespace, name };
    $("#purge-title").textContent = `Purge ${name}?`;
    $("#purge-text").textContent =
      `Delete the ${held} messages held for ${namespace}/${name} at every sidecar (those no consumer ` +
      "holds right now). This cannot be undone.";
    $("#purge-name").value = "";
    $("#purge-ok").disabled = true;
    $("#purge-dialog").showModal();
    $("#purge-name").focus();
  }

  async function confirmPurge() {
    const target = state.purge;
    if (!target || $("#purge-name").value !== target.name) return;
    $("#purge-ok").disabled = true;
    const k = `${target.namespace}/${target.name}`;
    try {
      const result = await postJSON(queuePath(target.namespace, target.name, "purge"), { confirm: target.name });
      const errors = result.sidecars.filter((s) => s.error).map((s) => `${s.name}: ${s.error}`);
      showResult(
        `Purge of ${k}: ${result.purged} deleted, ${result.skipped} skipped (held by a consumer), ` +
          `${result.remaining} still held` +
          (errors.length ? ` · not asked: ${errors.join("; ")}` : ""),
        errors.length > 0,
      );
    } catch (error) {
      showResult(`Purge of ${k} failed: ${error.message}`, true);
    } finally {
      state.purge = null;
      $("#purge-dialog").close();
    }
    state.messages.key = k;
    await refreshDeadLetters();
    await loadMessages(k, false);
  }

  // ---------- navigation ----------

  function route() {
    const wanted = location.hash.replace(/^#\/?/, "").split("/")[0] || "overview";
    state.page = PAGES.includes(wanted) ? wanted : "overview";
    for (const section of document.querySelectorAll("section.page")) {
      section.classList.toggle("hidden", section.dataset.page !== state.page);
    }
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("active", link.dataset.page === state.page);
    }
    document.body.dataset.page = state.page;
    render();
    if (state.page === "dead-letters") refreshDeadLetters();
  }

  function start() {
    window.addEventListener("hashchange", route);
    window.addEventListener("resize", render);
    $("#parked-peek").addEventListener("click", () => {
      const k = $("#parked-queue").value;
      if (k) loadMessages(k, true);
    });
    $("#messages-refresh").addEventListener("click", () => {
      if (state.messages.key) loadMessages(state.messages.key, true);
    });
    $("#messages-redrive").addEventListener("click", () => {
      const data = state.messages.data;
      if (!data) return;
      openConfirm(data.namespace, data.name, data.total, data.dead_letter_for);
    });
    $("#confirm-ok").addEventListener("click", confirmRedrive);
    $("#messages-purge").addEventListener("click", () => {
      const data = state.messages.data;
      if (data) openPurge(data.namespace, data.name, data.total);
    });
    $("#purge-name").addEventListener("input", () => {
      $("#purge-ok").disabled = !state.purge || $("#purge-name").value !== state.purge.name;
    });
    $("#purge-ok").addEventListener("click", confirmPurge);
    $("#purge-cancel").addEventListener("click", () => {
      state.purge = null;
      $("#purge-dialog").close();
    });
    $("#confirm-cancel").addEventListener("click", () => {
      state.confirm = null;
      $("#confirm-dialog").close();
    });
    route();
    pollStatus();
    pollDeadLetters();
  }

  start();
})();
