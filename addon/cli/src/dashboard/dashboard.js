// trellis dashboard: polls /api/graph every scrape interval (and /api/traces), then draws
// the service graph (SVG), the golden-metrics table and the latest traces. No framework,
// nothing fetched from elsewhere. Elements carry stable ids, classes and data attributes
// (node: g.node[data-id], edge: g.edge[data-source][data-target] with text.edge-label,
// rows: tr.workload[data-id] and tr.edge-row[data-source][data-target], trace:
// li.trace[data-trace-id] with span.span[data-role]) so tests and scripts can find them.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const NODE_W = 196;
  const NODE_H = 58;
  const ROW_GAP = 26;
  const COL_GAP_MAX = 440;
  const MARGIN = 24;
  const TREND_POINTS = 30; // as many as the server keeps (TREND_POINTS in dashboard.rs)
  const TRACES_SHOWN = 5;

  let latest = null; // the last /api/graph answer
  let failing = null; // why the last /api/graph fetch failed, if it did
  let shapeKey = ""; // the graph's nodes, layers and edges: redraw only when it changes

  const $ = (id) => document.getElementById(id);

  function html(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // --- formatting ---

  function health(success) {
    if (success === null || success === undefined) return "none";
    if (success >= 0.99) return "good";
    if (success >= 0.95) return "warn";
    return "bad";
  }

  /** Success rate, short: "100%", "99.5%". */
  function pctShort(s) {
    if (s === null || s === undefined) return "–";
    if (s >= 1) return "100%";
    return (Math.floor(s * 1000) / 10).toFixed(1) + "%";
  }

  /** Success rate as `trellis stat` prints it: "100.00%". */
  function pctLong(s) {
    if (s === null || s === undefined) return "–";
    return (s * 100).toFixed(2) + "%";
  }

  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const v = seconds * 1000;
    if (v < 10) return v.toFixed(2) + " ms";
    if (v < 100) return v.toFixed(1) + " ms";
    if (v < 1000) return v.toFixed(0) + " ms";
    return seconds.toFixed(2) + " s";
  }

  function rps(x) {
    if (x === null || x === undefined) return "–";
    if (x >= 100) return x.toFixed(0);
    if (x >= 10) return x.toFixed(1);
    return x.toFixed(2);
  }

  function ago(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h ago";
  }

  function clip(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  // --- service graph ---

  /** Positions: one column per layer (callers left), each column sorted by id, centred. */
  function layout(nodes, width) {
    const byLayer = new Map();
    for (const n of nodes) {
      if (!byLayer.has(n.layer)) byLayer.set(n.layer, []);
      byLayer.get(n.layer).push(n);
    }
    const layers = [...byLayer.keys()].sort((a, b) => a - b);
    const rows = Math.max(1, ...layers.map((l) => byLayer.get(l).length));
    const height = Math.max(160, rows * (NODE_H + ROW_GAP) - ROW_GAP + 2 * MARGIN);
    const cols = layers.length;
    const gap = cols > 1 ? Math.min(COL_GAP_MAX, (width - 2 * MARGIN - NODE_W) / (cols - 1)) : 0;
    const x0 = (width - ((cols - 1) * gap + NODE_W)) / 2;
    const pos = new Map();
    layers.forEach((l, i) => {
      const col = byLayer.get(l).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
      const total = col.length * NODE_H + (col.length - 1) * ROW_GAP;
      const y0 = (height - total) / 2;
      col.forEach((n, j) => pos.set(n.id, { x: x0 + i * gap, y: y0 + j * (NODE_H + ROW_GAP) }));
    });
    return { pos, height };
  }

  /** The edge's path and the point its label sits on. */
  function route(s, t, bottom) {
    if (s === t) {
      // A workload calling itself: a loop over its top right corner.
      const x = s.x + NODE_W - 36;
      const y = s.y;
      return {
        d: `M ${x} ${y} C ${x} ${y - 34}, ${x + 56} ${y - 34}, ${x + 36} ${y + 2}`,
        mx: x + 28,
        my: y - 26,
      };
    }
    if (t.x > s.x + NODE_W / 2) {
      const x1 = s.x + NODE_W;
      const y1 = s.y + NODE_H / 2;
      const x2 = t.x - 2;
      const y2 = t.y + NODE_H / 2;
      const c = Math.max(40, (x2 - x1) / 2);
      return {
        d: `M ${x1} ${y1} C ${x1 + c} ${y1}, ${x2 - c} ${y2}, ${x2} ${y2}`,
        mx: (x1 + 3 * (x1 + c) + 3 * (x2 - c) + x2) / 8,
        my: (y1 + 3 * y1 + 3 * y2 + y2) / 8,
      };
    }
    // Backwards (a cycle) or within a column: under the nodes.
    const x1 = s.x + NODE_W / 2 - 10;
    const y1 = s.y + NODE_H;
    const x2 = t.x + NODE_W / 2 + 10;
    const y2 = t.y + NODE_H + 2;
    const low = bottom - 8;
    return {
      d: `M ${x1} ${y1} C ${x1} ${low}, ${x2} ${low}, ${x2} ${y2}`,
      mx: (x1 + x2) / 2,
      my: (y1 + 3 * low + 3 * low + y2) / 8,
    };
  }

  function drawGraph(data) {
    const g = $("graph");
    const width = Math.max(480, g.clientWidth || 1000);
    const key =
      width +
      "|" +
      data.nodes.map((n) => n.id + ":" + n.layer).join(",") +
      "|" +
      data.edges.map((e) => e.source + ">" + e.target).join(",");
    if (key !== shapeKey) {
      shapeKey = key;
      build(g, data, width);
    }
    update(g, data);
  }

  function build(g, data, width) {
    while (g.firstChild) g.removeChild(g.firstChild);
    const { pos, height } = layout(data.nodes, width);
    const backwards = data.edges.some((e) => {
      const s = pos.get(e.source);
      const t = pos.get(e.target);
      return s && t && e.source !== e.target && !(t.x > s.x + NODE_W / 2);
    });
    const h = height + (backwards ? 56 : 0);
    g.setAttribute("viewBox", `0 0 ${width} ${h}`);
    g.style.height = h + "px";

    const defs = svg("defs");
    for (const state of ["good", "warn", "bad", "none"]) {
      const m = svg("marker", {
        id: "arrow-" + state,
        viewBox: "0 0 10 10",
        refX: "9",
        refY: "5",
        markerWidth: "7",
        markerHeight: "7",
        orient: "auto-start-reverse",
      });
      m.appendChild(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow " + state }));
      defs.appendChild(m);
    }
    g.appendChild(defs);

    if (data.nodes.length === 0) {
      g.appendChild(
        svg(
          "text",
          { class: "empty", x: width / 2, y: h / 2, "text-anchor": "middle" },
          data.errors && data.errors.length
            ? "Nothing to draw: the proxies could not be read (see above)"
            : "No workloads seen yet: waiting for requests between meshed workloads…",
        ),
      );
      return;
    }

    // Edges under the nodes; each edge group holds its path and its label.
    const edges = svg("g", { class: "edges" });
    for (const e of data.edges) {
      const s = pos.get(e.source);
      const t = pos.get(e.target);
      if (!s || !t) continue;
      const r = route(s, t, h);
      const eg = svg("g", { class: "edge", "data-source": e.source, "data-target": e.target });
      eg.appendChild(svg("title", {}, `${e.source} → ${e.target}`));
      eg.appendChild(svg("path", { class: "edge-path", d: r.d }));
      const lg = svg("g", {
        class: "edge-label-group",
        transform: `translate(${r.mx.toFixed(1)} ${r.my.toFixed(1)})`,
      });
      lg.appendChild(svg("rect", { class: "edge-label-box", rx: "10", ry: "10", height: "21", y: "-14.5" }));
      lg.appendChild(svg("text", { class: "edge-label", "text-anchor": "middle" }));
      eg.appendChild(lg);
      edges.appendChild(eg);
    }
    g.appendChild(edges);

    const nodes = svg("g", { class: "nodes" });
    for (const n of data.nodes) {
      const p = pos.get(n.id);
      const ng = svg("g", {
        class: "node",
        "data-id": n.id,
        "data-layer": String(n.layer),
        transform: `translate(${p.x.toFixed(1)} ${p.y.toFixed(1)})`,
      });
      ng.appendChild(svg("title", {}, n.id));
      ng.appendChild(svg("rect", { class: "node-box", width: NODE_W, height: NODE_H, rx: "10", ry: "10" }));
      ng.appendChild(svg("rect", { class: "node-accent", x: "7", y: "10", width: "4", height: NODE_H - 20, rx: "2" }));
      const name = svg("text", { class: "node-name", x: "20", y: "24" }, clip(n.name, 18));
      name.appendChild(svg("tspan", { class: "node-ns", dx: "7" }, clip(n.namespace, 14)));
      ng.appendChild(name);
      ng.appendChild(svg("text", { class: "node-metrics", x: "20", y: "44" }));
      nodes.appendChild(ng);
    }
    g.appendChild(nodes);
  }

  function update(g, data) {
    for (const n of data.nodes) {
      const ng = g.querySelector(`g.node[data-id="${CSS.escape(n.id)}"]`);
      if (!ng) continue;
      const out = outbound(data, n.id);
      // A caller only is coloured by what it got; a server by what it answered.
      const state = health(n.requests === null ? out.success : n.success);
      ng.setAttribute("class", "node " + state);
      const m = ng.querySelector("text.node-metrics");
      while (m.firstChild) m.removeChild(m.firstChild);
      if (n.requests === null && out.requests > 0) {
        m.appendChild(svg("tspan", { class: "rate" }, pctShort(out.success)));
        m.appendChild(svg("tspan", {}, ` · ${rps(out.rps)} rps out`));
      } else if (n.requests === null) {
        m.textContent = out.edges ? "caller · idle" : "no metrics from its proxy";
      } else if (n.requests === 0) {
        m.textContent = data.window_seconds > 0 ? "idle · 0 rps" : "measuring…";
      } else {
        m.appendChild(svg("tspan", { class: "rate" }, pctShort(n.success)));
        m.appendChild(svg("tspan", {}, ` · ${rps(n.rps)} rps · p99 ${ms(n.p99)}`));
      }
    }
    for (const e of data.edges) {
      const sel = `[data-source="${CSS.escape(e.source)}"][data-target="${CSS.escape(e.target)}"]`;
      const eg = g.querySelector("g.edge" + sel);
      if (!eg) continue;
      const lg = eg.querySelector("g.edge-label-group");
      const state = health(e.success);
      const active = e.requests > 0;
      eg.setAttribute("class", `edge ${state} ${active ? "active" : "idle"}`);
      const path = eg.querySelector("path.edge-path");
      path.setAttribute("marker-end", `url(#arrow-${state})`);
      path.style.strokeWidth = String(active ? Math.min(5, 1.6 + Math.log10(1 + e.rps) * 1.6) : 1.5);
      const t = lg.querySelector("text.edge-label");
      while (t.firstChild) t.removeChild(t.firstChild);
      if (active) {
        t.appendChild(svg("tspan", { class: "rate" }, pctShort(e.success)));
        t.appendChild(svg("tspan", {}, ` · ${rps(e.rps)} rps · p99 ${ms(e.p99)}`));
      } else {
        t.textContent = data.window_seconds > 0 ? "no requests" : "measuring…";
      }
      // The label's box fits its text.
      const box = lg.querySelector("rect.edge-label-box");
      let w = 0;
      try {
        w = t.getComputedTextLength();
      } catch (_) {
        w = t.textContent.length * 6.5;
      }
      w = (w || t.textContent.length * 6.5) + 18;
      box.setAttribute("width", w.toFixed(1));
      box.setAttribute("x", (-w / 2).toFixed(1));
    }
  }

  /** What a workload's calls got, over all its edges. */
  function outbound(data, id) {
    let requests = 0;
    let ok = 0;
    let rate = 0;
    let edges = 0;
    for (const e of data.edges) {
      if (e.source !== id) continue;
      edges += 1;
      requests += e.requests;
      rate += e.rps;
      ok += e.requests * (e.success === null ? 0 : e.success);
    }
    return { edges, requests, rps: rate, success: requests > 0 ? ok / requests : null };
  }

  // --- tables ---

  function sparkline(values) {
    const w = 100;
    const h = 22;
    const s = svg("svg", { class: "spark", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
    if (values.length < 2) return s;
    // Headroom above the highest point, so a steady rate is a line mid-height.
    const max = Math.max(...values, 1e-9) * 1.6;
    const step = w / (TREND_POINTS - 1);
    const x0 = w - (values.length - 1) * step;
    const pts = values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(h - 2 - (v / max) * (h - 4)).toFixed(1)}`);
    s.appendChild(svg("polygon", { class: "area", points: `${x0.toFixed(1)},${h} ${pts.join(" ")} ${w},${h}` }));
    s.appendChild(svg("polyline", { points: pts.join(" ") }));
    return s;
  }

  function drawTable(data) {
    const body = $("workload-rows");
    while (body.firstChild) body.removeChild(body.firstChild);
    if (data.nodes.length === 0) {
      const tr = html("tr", "placeholder");
      const td = html("td", "", data.generated_at_unix ? "no workloads seen yet" : "waiting for the first scrape…");
      td.colSpan = 8;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    // Workloads that serve first (busiest first), callers after.
    const nodes = [...data.nodes].sort((a, b) => {
      const ra = a.rps === null ? -1 : a.rps;
      const rb = b.rps === null ? -1 : b.rps;
      return rb - ra || (a.id < b.id ? -1 : 1);
    });
    for (const n of nodes) {
      const tr = html("tr", "workload");
      tr.dataset.id = n.id;
      const name = html("td", "left");
      name.appendChild(html("span", "ns", n.namespace + "/"));
      name.appendChild(html("span", "wl", n.name));
      if (n.requests === null) name.appendChild(html("span", "tag", "caller"));
      tr.appendChild(name);
      const succ = html("td", "success " + health(n.success), pctLong(n.success));
      if (n.success !== null) succ.dataset.value = String(n.success);
      tr.appendChild(succ);
      const cells = [
        ["rps", rps(n.rps)],
        ["p50", ms(n.p50)],
        ["p95", ms(n.p95)],
        ["p99", ms(n.p99)],
        ["requests", n.requests === null ? "–" : String(Math.round(n.requests))],
      ];
      for (const [cls, text] of cells) {
        tr.appendChild(html("td", cls + (text === "–" ? " none" : ""), text));
      }
      const trend = html("td", "trend");
      if (n.requests !== null) trend.appendChild(sparkline((data.trend && data.trend[n.id]) || []));
      tr.appendChild(trend);
      body.appendChild(tr);
    }
  }

  function drawEdges(data) {
    const body = $("edge-rows");
    while (body.firstChild) body.removeChild(body.firstChild);
    if (data.edges.length === 0) {
      const tr = html("tr", "placeholder");
      const td = html("td", "", data.generated_at_unix ? "no calls between workloads seen yet" : "waiting for the first scrape…");
      td.colSpan = 5;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    for (const e of data.edges) {
      const tr = html("tr", "edge-row");
      tr.dataset.source = e.source;
      tr.dataset.target = e.target;
      const name = html("td", "left");
      name.appendChild(html("span", "wl", e.source));
      name.appendChild(html("span", "arrow-sep", "→"));
      name.appendChild(html("span", "wl", e.target));
      tr.appendChild(name);
      const active = e.requests > 0;
      const succ = html("td", "success " + health(e.success), pctLong(e.success));
      tr.appendChild(succ);
      tr.appendChild(html("td", "rps", rps(e.rps)));
      tr.appendChild(html("td", "p99" + (e.p99 === null ? " none" : ""), ms(e.p99)));
      tr.appendChild(html("td", "requests" + (active ? "" : " none"), String(Math.round(e.requests))));
      body.appendChild(tr);
    }
  }

  // --- header, KPIs, errors ---

  function drawSummary(data) {
    const servers = data.nodes.filter((n) => n.requests !== null);
    const total = servers.reduce((a, n) => a + (n.requests || 0), 0);
    const ok = servers.reduce((a, n) => a + (n.requests || 0) * (n.success === null ? 0 : n.success), 0);
    const success = total > 0 ? ok / total : null;
    const p99s = servers.map((n) => n.p99).filter((p) => p !== null);
    $("kpi-workloads").textContent = String(data.nodes.length);
    $("kpi-edges").textContent = String(data.edges.length);
    $("kpi-rps").textContent = data.window_seconds > 0 ? rps(servers.reduce((a, n) => a + (n.rps || 0), 0)) : "–";
    const s = $("kpi-success");
    s.textContent = pctLong(success);
    s.className = "value " + health(success);
    $("kpi-p99").textContent = p99s.length ? ms(Math.max(...p99s)) : "–";

    $("window").textContent =
      data.window_seconds > 0 ? `window ${data.window_seconds.toFixed(1)} s` : "first scrape: rates next";
    const src = $("source");
    src.textContent = `${data.proxies} ${data.proxies === 1 ? "proxy" : "proxies"} read`;
    src.title = data.source;

    const box = $("errors");
    const list = $("error-list");
    while (list.firstChild) list.removeChild(list.firstChild);
    for (const e of data.errors || []) list.appendChild(html("li", "error", e));
    box.hidden = !(data.errors && data.errors.length);
  }

  function tick() {
    const dot = $("live");
    const text = $("updated");
    if (failing) {
      dot.className = "dot down";
      text.textContent = "dashboard unreachable (" + failing + "), retrying";
      return;
    }
    if (!latest || latest.generated_at_unix === null) {
      dot.className = "dot waiting";
      text.textContent = "waiting for the first scrape";
      return;
    }
    const age = Date.now() / 1000 - latest.generated_at_unix;
    const stale = age > 3 * Math.max(1, latest.interval_seconds);
    dot.className = "dot " + (stale || latest.errors.length ? "stale" : "live");
    text.textContent = "updated " + ago(age);
  }

  // --- traces ---

  async function pollTraces() {
    const list = $("traces");
    const hint = $("traces-hint");
    let traces;
    try {
      const r = await fetch("/api/traces", { cache: "no-store" });
      const body = await r.json();
      if (!r.ok) throw new Error(body && body.error ? body.error : "HTTP " + r.status);
      traces = body;
    } catch (e) {
      hint.textContent = "traces unavailable";
      list.replaceChildren(html("li", "placeholder", String(e.message || e)));
      return;
    }
    const fromControlPlane = latest && latest.traces_source;
    hint.textContent = fromControlPlane ? "from " + latest.traces_source : "";
    if (!Array.isArray(traces) || traces.length === 0) {
      list.replaceChildren(
        html(
          "li",
          "placeholder",
          fromControlPlane
            ? "no traces yet (tracing.sampling and tracing.otlp: mesh in trellis-config)"
            : "traces come from the control plane: run without --proxy to see them",
        ),
      );
      return;
    }
    const now = Date.now() / 1000;
    const items = traces.slice(0, TRACES_SHOWN).map((t) => {
      const li = html("li", "trace");
      li.dataset.traceId = t.trace_id;
      const head = html("div", "trace-head");
      head.appendChild(html("span", "trace-id", t.trace_id));
      const spans = t.spans || [];
      const longest = Math.max(0, ...spans.map((s) => s.duration_ms || 0));
      head.appendChild(html("span", "trace-meta", `${spans.length} ${spans.length === 1 ? "span" : "spans"} · ${longest.toFixed(2)} ms · ${ago(now - t.start_unix)}`));
      li.appendChild(head);
      const row = html("div", "trace-spans");
      spans.forEach((s, i) => {
        if (i > 0) row.appendChild(html("span", "hop", "→"));
        const bad = s.error || (s.status_code !== null && s.status_code >= 500);
        const chip = html("span", `span ${s.kind}${bad ? " error" : ""}`);
        chip.dataset.role = s.role;
        chip.dataset.kind = s.kind;
        chip.title = `${s.kind} span ${s.span_id}: ${s.name} ${s.target}`;
        chip.appendChild(html("span", "kind", s.kind));
        chip.appendChild(html("span", "role", s.role));
        const status = s.status_code === null ? "" : s.status_code + " · ";
        chip.appendChild(html("span", "ms", `${status}${(s.duration_ms || 0).toFixed(2)} ms`));
        row.appendChild(chip);
      });
      li.appendChild(row);
      return li;
    });
    list.replaceChildren(...items);
  }

  // --- polling ---

  function render(data) {
    latest = data;
    drawSummary(data);
    drawGraph(data);
    drawTable(data);
    drawEdges(data);
  }

  async function poll() {
    try {
      const r = await fetch("/api/graph", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const data = await r.json();
      failing = null;
      render(data);
    } catch (e) {
      failing = String(e.message || e);
    }
    tick();
    await pollTraces();
    const every = latest ? Math.max(0.2, latest.interval_seconds) : 2;
    setTimeout(poll, every * 1000);
  }

  window.addEventListener("resize", () => {
    if (latest) drawGraph(latest);
  });
  setInterval(tick, 1000);
  poll();
})();
