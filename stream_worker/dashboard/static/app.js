/* lookout live dashboard: polls the JSON API and renders it. Every string that comes from
 * the data (source ids, labels) goes through textContent, never innerHTML: source ids come
 * from Kafka headers, which anyone who can produce frames controls. */
"use strict";

(function () {
  const POLL_MS = 2000;
  const SOURCES_EVERY = 5; // polls between refreshes of the source list
  const FETCH_TIMEOUT_MS = 8000;
  const MIN_CHART_HEIGHT = 240;
  const PALETTE = {
    car: "#38bdf8", truck: "#f59e0b", bus: "#a78bfa", motorcycle: "#f472b6", bicycle: "#34d399",
    person: "#facc15", unknown: "#64748b", bird: "#60a5fa", deer: "#fb923c", fox: "#f97316",
    wild_boar: "#a3a3a3", bear: "#b45309", squirrel: "#fca5a5", rabbit: "#e9d5ff", dog: "#86efac",
    cat: "#fde68a", horse: "#c4b5fd", cattle: "#fdba74", sheep: "#e5e7eb",
    vehicle: "#7dd3fc", animal: "#bef264", mammal: "#fcd34d",
  };
  const FALLBACK = ["#22d3ee", "#e879f9", "#4ade80", "#fb7185", "#818cf8", "#2dd4bf", "#fbbf24", "#c084fc"];

  const $ = (id) => document.getElementById(id);
  const state = {
    sources: [],
    windows: [],
    source: null,
    window: null,
    stats: new Map(),
    chart: null,
    chartKey: "",
    chartSeries: {},
    xRange: [0, 1],
    cards: new Map(),
    polls: 0,
  };

  function color(name) {
    name = name.replace(/ \(type unclear\)$/, "");
    if (PALETTE[name]) return PALETTE[name];
    let h = 0;
    for (const c of name) h = (h * 31 + c.codePointAt(0)) >>> 0;
    return FALLBACK[h % FALLBACK.length];
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    return Number(value).toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function latency(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return ["–", "ms"];
    if (Math.abs(ms) < 1000) return [fmt(ms, 0), "ms"];
    return [fmt(ms / 1000, Math.abs(ms) < 10000 ? 2 : 1), "s"];
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 2) return "just now";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function windowSeconds(name) {
    const m = /^(\d+)(ms|s|m|h|d)$/.exec(name || "");
    if (!m) return 60;
    return Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
  }

  /* Labels without a picture: thumbnails are off (--thumbnail-rate 0), or one could not be made. */
  function missingText(s) {
    return s && s.latest && s.latest.frame_id ? "no picture" : "no recent frame";
  }

  function thumbUrl(id, version) {
    return "/api/thumb/" + encodeURIComponent(id) + ".jpg?v=" + encodeURIComponent(version || 0);
  }

  async function api(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const res = await fetch(path, { signal: ctl.signal, cache: "no-store" });
      if (!res.ok) {
        let why = res.status + " " + res.statusText;
        try { why = (await res.json()).error || why; } catch (_) { /* not JSON */ }
        throw new Error(why);
      }
      return await res.json();
    } finally {
      clearTimeout(timer);
    }
  }

  function setStatus(ok, text) {
    const s = $("status");
    s.classList.toggle("live", ok);
    s.classList.toggle("down", !ok);
    $("status-text").textContent = text;
    const banner = $("banner");
    banner.hidden = ok;
    if (!ok) banner.textContent = "The dashboard cannot read live data: " + text;
  }

  /* ---- location hash keeps the selection (shareable links, survives reloads) ---- */
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    return { source: params.get("source"), window: params.get("window") };
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.source) params.set("source", state.source);
    if (state.window) params.set("window", state.window);
    history.replaceState(null, "", "#" + params.toString());
  }

  /* ---- controls ---- */
  function renderControls() {
    const select = $("source");
    const ids = state.sources.map((s) => s.id);
    const current = Array.from(select.options).map((o) => o.value);
    if (ids.join("\n") !== current.join("\n")) {
      select.replaceChildren(...ids.map((id) => { const o = el("option", null, id); o.value = id; return o; }));
    }
    if (state.source) select.value = state.source;
    const seg = $("windows");
    if (seg.children.length !== state.windows.length) {
      seg.replaceChildren(...state.windows.map((w) => {
        const b = el("button", null, w);
        b.type = "button";
        b.dataset.window = w;
        b.addEventListener("click", () => selectWindow(w));
        return b;
      }));
    }
    for (const b of seg.children) b.setAttribute("aria-pressed", String(b.dataset.window === state.window));
    $("source-count").textContent = ids.length ? "· " + ids.length : "";
  }

  function selectSource(id) {
    if (!id || id === state.source) return;
    state.source = id;
    writeHash();
    renderControls();
    renderSelected();
    refreshCounts();
  }

  function selectWindow(w) {
    if (w === state.window) return;
    state.window = w;
    writeHash();
    renderControls();
    refreshCounts();
  }

  /* ---- KPIs and the latest frame of the selected source ---- */
  function renderSelected() {
    const s = state.stats.get(state.source);
    $("kpi-fps").textContent = s ? fmt(s.fps, 1) : "–";
    $("kpi-frames").textContent = s ? fmt(s.frames, 0) : "–";
    const [lat, unit] = latency(s && s.latency_ms);
    $("kpi-latency").textContent = lat;
    $("kpi-latency-unit").textContent = unit;
    $("kpi-dead-rate").textContent = s ? fmt(s.dead_per_s, 2) : "–";
    $("kpi-dead").textContent = s ? fmt(s.dead, 0) : "–";
    $("kpi-dead-share").textContent = s ? fmt(100 * s.dead_share, 1) + " %" : "–";
    const drift = s && s.low_confidence_share !== null ? 100 * s.low_confidence_share : null;
    $("kpi-drift").textContent = fmt(drift, 1);
    const meter = $("kpi-drift-meter");
    meter.style.width = (drift === null ? 0 : Math.min(100, drift)) + "%";
    meter.classList.toggle("warn", drift !== null && drift >= 30 && drift < 60);
    meter.classList.toggle("bad", drift !== null && drift >= 60);

    const img = $("latest-thumb");
    const missing = $("latest-missing");
    if (s && s.thumbnail) {
      const url = thumbUrl(s.id, s.latest.frame_id);
      if (img.dataset.src !== url) { img.dataset.src = url; img.src = url; }
      img.hidden = false;
      missing.hidden = true;
    } else {
      img.hidden = true;
      missing.hidden = false;
      missing.textContent = missingText(s);
    }
    $("latest-age").textContent = s ? age(s.age_s) : "";
    const labels = $("latest-labels");
    labels.replaceChildren(...((s && s.latest.labels) || []).map((l) => {
      const li = el("li", null, l.label);
      li.append(el("span", "score", fmt(l.score, 2)));
      return li;
    }));
    const meta = $("latest-meta");
    meta.textContent = s && s.latest.frame_id ? "frame " + s.latest.frame_id
      + (s.latest.top_k.length ? " · top class " + s.latest.top_k[0].name : "") : "";
  }

  /* ---- the per-source cards ---- */
  function card(id) {
    let c = state.cards.get(id);
    if (c) return c;
    const root = el("button", "src-card");
    root.type = "button";
    root.dataset.source = id;
    root.addEventListener("click", () => selectSource(id));
    const frame = el("div", "thumb-frame");
    const img = el("img");
    img.alt = "latest frame of " + id;
    img.hidden = true;
    const missing = el("span", "thumb-missing", "no recent frame");
    const badge = el("span", "badge");
    const ageTag = el("span", "age");
    frame.append(img, missing, badge, ageTag);
    const body = el("div", "src-body");
    const name = el("div", "src-name", id);
    name.title = id;
    const labels = el("ul", "labels");
    const metrics = el("div", "src-metrics");
    const cells = {};
    for (const [key, caption] of [["fps", "frames/s"], ["lat", "latency"], ["dead", "dead/s"], ["drift", "drift"]]) {
      const m = el("div", "metric");
      cells[key] = el("b", null, "–");
      m.append(cells[key], el("span", null, caption));
      metrics.append(m);
    }
    body.append(name, labels, metrics);
    root.append(frame, body);
    c = { root, img, missing, badge, ageTag, labels, cells };
    state.cards.set(id, c);
    return c;
  }

  function renderCards(list) {
    const grid = $("sources");
    const seen = new Set();
    for (const s of list) {
      seen.add(s.id);
      const c = card(s.id);
      c.root.classList.toggle("selected", s.id === state.source);
      c.badge.textContent = s.kind || "source";
      c.ageTag.textContent = age(s.age_s);
      c.ageTag.classList.toggle("stale", s.age_s !== null && s.age_s > 30);
      if (s.thumbnail) {
        const url = thumbUrl(s.id, s.latest.frame_id);
        if (c.img.dataset.src !== url) { c.img.dataset.src = url; c.img.src = url; }
        c.img.hidden = false;
        c.missing.hidden = true;
      } else {
        c.img.hidden = true;
        c.missing.hidden = false;
        c.missing.textContent = missingText(s);
      }
      c.labels.replaceChildren(...(s.latest.labels || []).slice(0, 3).map((l) => {
        const li = el("li", null, l.label);
        li.append(el("span", "score", fmt(l.score, 2)));
        return li;
      }));
      c.cells.fps.textContent = fmt(s.fps, 1);
      c.cells.lat.textContent = latency(s.latency_ms).join(" ");
      c.cells.dead.textContent = fmt(s.dead_per_s, 2);
      c.cells.drift.textContent = s.low_confidence_share === null ? "–" : fmt(100 * s.low_confidence_share, 0) + "%";
      if (c.root.parentNode !== grid) grid.append(c.root);
    }
    for (const [id, c] of state.cards) {
      if (!seen.has(id)) { c.root.remove(); state.cards.delete(id); }
    }
  }

  /* ---- counts: stacked bars per window, and the totals table ---- */
  function renderCounts(data) {
    const wildlife = data.kind === "wildlife";
    const series = wildlife ? data.events : data.labels;
    const totals = wildlife ? data.totals.events : data.totals.labels;
    const groups = new Set(wildlife ? [] : data.groups);
    $("chart-title").textContent = wildlife ? "Camera-trap events per species" : "Vehicles and other labels per window";
    $("chart-hint").textContent = data.starts.length + " × " + data.window + " windows";
    $("totals-title").textContent = wildlife ? "Events" : "Totals";
    $("totals-hint").textContent = data.source;

    const leaves = Object.keys(series).filter((n) => !groups.has(n))
      .sort((a, b) => (totals[b] - totals[a]) || a.localeCompare(b));
    renderTotals(data, totals, leaves, [...groups].filter((g) => g in totals));
    const chartSeries = wildlife ? series : withUnclearTypes(series, leaves, data.parents, groups);
    const chartTotals = (n) => chartSeries[n].reduce((a, b) => a + b, 0);
    const stacked = Object.keys(chartSeries).sort((a, b) => (chartTotals(b) - chartTotals(a)) || a.localeCompare(b));
    renderChart(data, chartSeries, stacked);
    document.body.dataset.counts = data.source + "|" + data.window + "|" + data.totals.frames;
  }

  // The chart stacks leaves. A group counts every frame of its children plus the frames that
  // were only sure enough of the group (rolled up to "vehicle"); that remainder is stacked as
  // "vehicle (type unclear)", so every labelled frame shows once.
  function withUnclearTypes(series, leaves, parents, groups) {
    const out = {};
    for (const name of leaves) out[name] = series[name];
    for (const group of groups) {
      const children = Object.keys(parents).filter((c) => parents[c] === group);
      const rest = series[group].map((v, i) => Math.max(0, v - children.reduce((acc, c) => acc + series[c][i], 0)));
      if (rest.some((v) => v > 0)) out[group + " (type unclear)"] = rest;
    }
    return out;
  }

  function renderTotals(data, totals, leaves, groups) {
    const body = $("totals").tBodies[0];
    const frames = data.totals.frames;
    const rows = [...leaves, ...groups].map((name) => {
      const tr = el("tr", groups.includes(name) ? "group" : null);
      tr.dataset.label = name;
      const label = el("td");
      const sw = el("span", "swatch");
      sw.style.background = color(name);
      label.append(sw, el("span", "name", name));
      const n = el("td", "num", String(totals[name]));
      const share = el("td", "share");
      const bar = el("div", "bar");
      const fill = el("div");
      // Share of the frames counted (a frame counts for its label and the label's groups).
      fill.style.width = (frames ? Math.min(100, (100 * totals[name]) / frames) : 0) + "%";
      fill.style.background = color(name);
      bar.append(fill);
      share.append(bar);
      tr.append(label, n, share);
      return tr;
    });
    body.replaceChildren(...rows);
    $("totals-frames").textContent = String(data.totals.frames);
  }

  function renderChart(data, series, stacked) {
    const host = $("chart");
    const empty = data.starts.length === 0 || stacked.length === 0;
    $("chart-empty").hidden = !empty;
    host.hidden = empty;
    if (empty) {
      if (state.chart) { state.chart.destroy(); state.chart = null; state.chartKey = ""; }
      return;
    }
    const xs = data.starts.map((ms) => ms / 1000);
    // Stacked bars: series k holds the sum of the k smallest-ranked labels and is drawn first
    // (tallest), so each label shows as the band between its sum and the next one.
    const cumulative = [];
    let running = xs.map(() => 0);
    for (const name of stacked) {
      running = running.map((v, i) => v + series[name][i]);
      cumulative.push(running);
    }
    const order = stacked.map((_, i) => stacked.length - 1 - i);
    const plotData = [xs, ...order.map((i) => cumulative[i])];
    host.dataset.stackTops = running.join(",");
    const key = [data.source, data.window, ...stacked].join("\n");
    state.chartSeries = series;
    // Half a window of room either side, so a lone first window is a bar, not a sliver.
    const step = windowSeconds(data.window);
    state.xRange = [xs[0] - step * 0.6, xs[xs.length - 1] + step * 0.6];
    if (state.chart && state.chartKey === key) {
      state.chart.setData(plotData);
      fitChart();
      return;
    }
    if (state.chart) state.chart.destroy();
    const bars = uPlot.paths.bars({ size: [0.72, 80], align: 0 });
    const axis = {
      stroke: "#8b95a7",
      grid: { stroke: "rgba(148,163,184,0.08)", width: 1 },
      ticks: { stroke: "rgba(148,163,184,0.15)", width: 1 },
      font: "12px system-ui, sans-serif",
    };
    const opts = {
      width: Math.max(300, host.clientWidth),
      height: MIN_CHART_HEIGHT,
      cursor: { points: { show: false } },
      scales: {
        x: { time: true, range: () => state.xRange },
        y: { range: (u, min, max) => [0, Math.max(1, max) * 1.12] },
      },
      axes: [axis, { ...axis, size: 48 }],
      legend: { live: true },
      series: [
        {},
        ...order.map((i) => {
          const name = stacked[i];
          return {
            label: name,
            stroke: color(name),
            fill: color(name) + "d0",
            width: 0,
            paths: bars,
            points: { show: false },
            // The legend shows the label's own count, not the stacked sum.
            value: (u, v, si, idx) => (idx === null || idx === undefined ? "–" : String(state.chartSeries[name][idx])),
          };
        }),
      ],
    };
    host.replaceChildren();
    state.chart = new uPlot(opts, plotData, host);
    state.chartKey = key;
    fitChart();
  }

  // The plot takes the host's height less its legend (the legend sits inside uPlot's root).
  function fitChart() {
    const host = $("chart");
    if (!state.chart || host.clientWidth === 0) return;
    const legend = state.chart.root.querySelector(".u-legend");
    const height = Math.max(MIN_CHART_HEIGHT, host.clientHeight - (legend ? legend.offsetHeight : 0) - 4);
    if (state.chart.width !== host.clientWidth || state.chart.height !== height) {
      state.chart.setSize({ width: host.clientWidth, height });
    }
  }

  /* ---- polling ---- */
  async function refreshSources() {
    const data = await api("/api/sources");
    state.sources = data.sources;
    state.windows = data.windows;
    const wanted = readHash();
    if (!state.window) state.window = data.windows.includes(wanted.window) ? wanted.window : data.windows[0];
    const ids = data.sources.map((s) => s.id);
    if (!state.source || !ids.includes(state.source)) {
      state.source = ids.includes(wanted.source) ? wanted.source : freshest(ids);
      writeHash();
    }
    renderControls();
  }

  // With nothing chosen, the page opens on the source that sent a frame last: where Redis still
  // holds sources that stopped long ago, a newcomer sees the live camera, not the first name.
  function freshest(ids) {
    let best = null;
    let when = -Infinity;
    for (const id of ids) {
      const s = state.stats.get(id);
      if (s && typeof s.updated_ms === "number" && s.updated_ms > when) { best = id; when = s.updated_ms; }
    }
    return best || ids[0] || null;
  }

  async function refreshStats() {
    const data = await api("/api/stats");
    state.stats = new Map(data.sources.map((s) => [s.id, s]));
    renderCards(data.sources);
    renderSelected();
  }

  async function refreshCounts() {
    if (!state.source || !state.window) return;
    const source = state.source;
    const win = state.window;
    const data = await api("/api/counts?source=" + encodeURIComponent(source) + "&window=" + encodeURIComponent(win));
    // A reply for a selection the user has since left is dropped.
    if (source === state.source && win === state.window) renderCounts(data);
  }

  async function poll() {
    try {
      if (!state.source) await refreshStats(); // freshest() picks the default from them
      if (state.polls % SOURCES_EVERY === 0 || !state.source) await refreshSources();
      await Promise.all([refreshStats(), refreshCounts()]);
      setStatus(true, "live · " + new Date().toLocaleTimeString());
    } catch (err) {
      setStatus(false, err && err.message ? err.message : String(err));
    }
    state.polls += 1;
    setTimeout(poll, POLL_MS);
  }

  $("source").addEventListener("change", (e) => selectSource(e.target.value));
  window.addEventListener("hashchange", () => {
    const wanted = readHash();
    if (wanted.window && state.windows.includes(wanted.window)) selectWindow(wanted.window);
    if (wanted.source) selectSource(wanted.source);
  });
  if (window.ResizeObserver) new ResizeObserver(fitChart).observe($("chart"));
  poll();
})();
