// ponder view: the page over a results store. Plain JavaScript and SVG, no library and
// no request outside the machine. Views by the URL's hash (state in the query, so Back
// and a shared link give the same page):
//   #/                                   the frontier of every task
//   #/problems/TASK?a=ID&b=ID&rel=&sort=&only=1   one row per problem, a column per setting
//   #/p/TASK/PROBLEM                     one problem across the settings
//   #/g/KEY                              one generation: its samples, its tree, or its text
// The overview is inlined in the page (script#ponder-data). A served page fetches a
// task's problems from /api/problems/TASK and a generation from /api/generation/KEY; an
// exported one has them all inline, gzip-compressed (script#ponder-packed).
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("ponder-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const app = document.getElementById("app");
  const tip = document.getElementById("tooltip");
  // 16 colours far apart in hue and lightness (after Trubetskoy's 20 distinct colours):
  // neighbours in the list never share a hue family, so 13 strategies stay apart
  const PALETTE = ["#4363d8", "#e6194b", "#3cb44b", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#808000",
                   "#000075", "#9a6324", "#469990", "#bfef45", "#a9a9a9", "#000000", "#dcbeff", "#ffe119"];
  const SHAPES = ["circle", "square", "triangle", "diamond", "down"];  // one per model
  const HIDDEN_META = new Set(["votes", "prefix_cache_hit_tokens", "tree", "strategy"]);

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null) e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }
  function sv(tag, attrs) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  const fmt = (x, d = 1) => (x === null || x === undefined) ? "" : Number(x).toFixed(d);
  const sci = (x) => (x === null || x === undefined) ? "" : Number(x).toExponential(2);
  const enc = encodeURIComponent;
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                           "'": "&#39;" }[c]));
  const mark = (c) => c === null || c === undefined ? "" : c ? "\u2713" : "\u2717";

  function page(title, ...kids) {
    app.replaceChildren(el("h2", { text: title }), ...kids);
    document.title = "ponder view: " + title;
    window.scrollTo(0, 0);
  }
  function problemPage(message) {  // bad input gets a page that says what to do, never a stack trace
    app.replaceChildren(el("div", { class: "error", id: "error" }, el("h2", { text: "Cannot show this" }),
      el("p", { text: message }), el("p", {}, el("a", { href: "#/", text: "Back to the overview" }))));
    document.title = "ponder view: cannot show this";
  }
  function showTip(ev, lines) {
    tip.replaceChildren(...lines.filter((l) => l !== "").map((l) => el("div", { text: l })));
    tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 12, window.innerWidth - 300) + "px";
    tip.style.top = (ev.clientY + 12) + "px";
  }
  const hideTip = () => { tip.style.display = "none"; };
  const scoreColour = (s) => (s === null || s === undefined) ? "#bbb"
    : `hsl(${Math.round(120 * Math.max(0, Math.min(1, s)))}, 65%, 45%)`;

  // -- data: inline (the overview), fetched (served) or unpacked (exported) ----------------
  let unpacked = null;
  function packed() {  // the export's problems and generations: gzip + base64, read once
    if (!unpacked) {
      const src = document.getElementById("ponder-packed").textContent.trim();
      unpacked = !src ? Promise.resolve({}) : fetch("data:application/octet-stream;base64," + src)
        .then((r) => new Response(r.body.pipeThrough(new DecompressionStream("gzip"))).json());
    }
    return unpacked;
  }
  const fetched = {};
  async function api(path) {
    if (!fetched[path]) {
      fetched[path] = fetch(path).then(async (r) => {
        const body = await r.json().catch(() => ({ error: `the server answered ${r.status}` }));
        if (!r.ok) { delete fetched[path]; throw new Error(body.error || `the server answered ${r.status}`); }
        return body;
      }, () => { delete fetched[path]; throw new Error("The ponder view server did not answer; is it still running?"); });
    }
    return fetched[path];
  }
  async function problemsOf(task) {
    if (DATA.mode === "export") return ((await packed()).problems || {})[task] || [];
    return api("api/problems/" + enc(task));
  }
  async function generationOf(key) {
    if (DATA.mode === "export") return ((await packed()).generations || {})[key] || null;
    return api("api/generation/" + enc(key));
  }

  // -- overview: the frontier per task ---------------------------------------------------
  function overview() {
    const tasks = Object.keys(DATA.tasks);
    if (!tasks.length) return problemPage("This store has no results yet: run ponder sweep into it first.");
    const parts = [];
    for (const task of tasks) {
      parts.push(...(DATA.tasks[task].judged ? frontier(task, DATA.tasks[task].settings)
                                             : live(task, DATA.tasks[task].settings)));
    }
    page(`Quality against compute (${DATA.rows} stored generations)`, ...parts);
  }

  function frontier(task, settings) {
    const axis = el("select", { id: "cost-" + task, class: "cost" },
      el("option", { value: "generated_tokens", text: "generated tokens" }), el("option", { value: "flops", text: "FLOPs" }));
    const holder = el("div", {});
    const draw = () => holder.replaceChildren(frontierPlot(task, settings, axis.value));
    axis.addEventListener("change", draw);
    draw();
    return [el("h2", { text: task }), ...frontierRest(task, settings, el("div", { class: "controls" }, "x axis:", axis), holder)];
  }

  function styles(settings) {  // a colour per strategy and a marker shape per model, the same everywhere
    const strategies = [...new Set(settings.map((s) => s.strategy))];
    const models = [...new Set(settings.map((s) => s.model))];
    return { strategies, models, colour: (s) => PALETTE[strategies.indexOf(s) % PALETTE.length],
             shape: (m) => SHAPES[models.indexOf(m) % SHAPES.length] };
  }

  function glyph(shape, x, y, r) {  // an SVG path of a marker centred on (x, y)
    const d = {
      circle: `M${x - r},${y}a${r},${r} 0 1,0 ${2 * r},0a${r},${r} 0 1,0 ${-2 * r},0Z`,
      square: `M${x - r},${y - r}h${2 * r}v${2 * r}h${-2 * r}Z`,
      triangle: `M${x},${y - 1.2 * r}L${x + 1.1 * r},${y + 0.8 * r}L${x - 1.1 * r},${y + 0.8 * r}Z`,
      diamond: `M${x},${y - 1.3 * r}L${x + 1.3 * r},${y}L${x},${y + 1.3 * r}L${x - 1.3 * r},${y}Z`,
      down: `M${x},${y + 1.2 * r}L${x + 1.1 * r},${y - 0.8 * r}L${x - 1.1 * r},${y - 0.8 * r}Z`,
    }[shape];
    return d;
  }

  function budget(setting) {  // what a point spends, for its label: N = 16, 8 it., 4 beams
    for (const [k, l] of [["samples", "N="], ["iterations", "it="], ["num_beams", "beams="], ["particles", "P="],
                          ["rounds", "rounds="], ["trials", "trials="]]) {
      if (setting[k] !== undefined) return l + setting[k];
    }
    return "";
  }

  function frontierPlot(task, settings, cost) {  // cost: "generated_tokens" or "flops", per problem, log scale
    const onFront = (s) => (cost === "flops" ? s.frontier_flops : s.frontier);  // over every model
    const onModelFront = (s) => (cost === "flops" ? s.model_frontier_flops : s.model_frontier);
    const W = 800, H = 440, L = 56, R = 90, T = 16, B = 44;
    const xs = settings.map((s) => Math.max(1, s[cost]));
    const lx0 = Math.log10(Math.min(...xs)) - 0.1, lx1 = Math.log10(Math.max(...xs)) + 0.1;
    const ylo = Math.max(0, Math.floor(10 * Math.min(...settings.map((s) => s.ci95[0]))) / 10);
    const X = (v) => L + (Math.log10(Math.max(1, v)) - lx0) / Math.max(1e-9, lx1 - lx0) * (W - L - R);
    const Y = (a) => T + (1 - (a - ylo) / Math.max(1e-9, 1 - ylo)) * (H - T - B);
    const svg = sv("svg", { class: "frontier-svg", width: W, height: H, viewBox: `0 0 ${W} ${H}`,
                            "data-task": task });
    svg.append(sv("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fff", stroke: "#ccc" }));
    for (let a = ylo; a <= 1.0001; a += 0.1) {
      svg.append(sv("line", { x1: L, x2: W - R, y1: Y(a), y2: Y(a), stroke: "#eee" }));
      const t = sv("text", { x: L - 6, y: Y(a) + 4, "text-anchor": "end", "font-size": 11 });
      t.textContent = a.toFixed(1);
      svg.append(t);
    }
    for (let p = Math.floor(lx0); p <= Math.floor(lx1); p++) {
      for (const m of [1, 2, 5]) {
        const v = m * 10 ** p;
        if (Math.log10(v) < lx0 || Math.log10(v) > lx1) continue;
        svg.append(sv("line", { x1: X(v), x2: X(v), y1: T, y2: H - B, stroke: "#eee" }));
        const t = sv("text", { x: X(v), y: H - B + 14, "text-anchor": "middle", "font-size": 11 });
        t.textContent = cost === "flops" ? `${m}e${p}` : String(v);
        svg.append(t);
      }
    }
    const xl = sv("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", "font-size": 12 });
    xl.textContent = (cost === "flops" ? "FLOPs" : "generated tokens") + " per problem (log)";
    const yl = sv("text", { x: 14, y: (T + H - B) / 2, transform: `rotate(-90 14 ${(T + H - B) / 2})`,
                            "text-anchor": "middle", "font-size": 12 });
    yl.textContent = "accuracy";
    svg.append(xl, yl);
    const st = styles(settings);
    // a frontier per model: models are never joined into one line
    st.models.forEach((m, mi) => {
      const front = settings.filter((s) => s.model === m && onModelFront(s)).sort((a, b) => a[cost] - b[cost]);
      if (!front.length) return;
      if (front.length > 1) {
        svg.append(sv("polyline", { points: front.map((s) => `${X(s[cost])},${Y(s.accuracy)}`).join(" "),
                                    fill: "none", stroke: "#d4a017", "stroke-width": 2,
                                    "stroke-dasharray": ["6 3", "2 3", "10 3 2 3", "1 5"][mi % 4],
                                    class: "frontier-line", "data-model": m }));
      }
      if (st.models.length > 1) {  // say whose frontier it is, at its most accurate end
        const last = front[front.length - 1];
        const t = sv("text", { x: X(last[cost]) + 10, y: Y(last.accuracy) - 8, "font-size": 11, fill: "#8a6a00",
                               class: "frontier-model" });
        t.textContent = m;
        svg.append(t);
      }
    });
    const whiskers = sv("g", { "pointer-events": "none" }), points = sv("g", {}), labels = sv("g", { "pointer-events": "none" });
    svg.append(whiskers, points, labels);
    // x is always the cost and y the accuracy. Points that would cover each other stay where
    // they are: the first is a filled marker, the next ones rings around it, each clickable.
    const placed = [];
    const marks = settings.map((s) => {
      const x = X(s[cost]), y = Y(s.accuracy);
      const near = placed.filter(([px, py]) => Math.abs(px - x) < 9 && Math.abs(py - y) < 9).length;
      placed.push([x, y]);
      return { s, x, y, ring: near };
    });
    marks.sort((a, b) => b.ring - a.ring);  // the widest rings underneath, the filled marker on top
    for (const { s, x, y, ring } of marks) {
      whiskers.append(sv("line", { x1: x, x2: x, y1: Y(s.ci95[0]), y2: Y(s.ci95[1]), stroke: st.colour(s.strategy),
                                   "stroke-opacity": 0.5 }));
      const r = (onFront(s) ? 6.5 : 5) + 5 * ring;
      const c = sv("path", { d: glyph(st.shape(s.model), x, y, r), class: "point" + (ring ? " ring" : ""),
                             fill: ring ? "none" : st.colour(s.strategy), stroke: ring ? st.colour(s.strategy) : "#fff",
                             "stroke-width": ring ? 3 : 1, "data-setting": s.id, "data-frontier": onFront(s) ? "1" : "0",
                             "data-x": s[cost], "data-model": s.model });
      c.addEventListener("mousemove", (ev) => showTip(ev, [s.label, `model ${s.model}`,
        `accuracy ${fmt(s.accuracy, 3)} [${fmt(s.ci95[0], 3)}, ${fmt(s.ci95[1], 3)}] (${s.correct}/${s.problems})`,
        `${fmt(s.generated_tokens)} generated tokens, ${sci(s.flops)} FLOPs per problem`,
        onFront(s) ? "on the frontier (every model)" : onModelFront(s) ? `on ${s.model}'s frontier` : "",
        "click: its problems"]));
      c.addEventListener("mouseleave", hideTip);
      c.addEventListener("click", () => {
        hideTip();
        location.hash = problemsHash(task, { a: s.id, b: partnerOf(s, settings), only: "1" });
      });
      points.append(c);
      const b = budget(s.setting);
      if (b && !ring) {
        const t = sv("text", { x: x + 7, y: y - 7, "font-size": 10, fill: "#444", class: "budget" });
        t.textContent = b;
        labels.append(t);
      }
    }
    return svg;
  }

  // a frontier point's problems compare it with the most accurate other setting of its
  // model (fewest tokens among equals), so B is never arbitrary
  function partnerOf(s, settings) {
    const others = settings.filter((o) => o.id !== s.id);
    const same = others.filter((o) => o.model === s.model);
    const pool = same.length ? same : others;
    if (!pool.length) return s.id;
    return pool.slice().sort((a, b) => (b.accuracy - a.accuracy) || (a.generated_tokens - b.generated_tokens))[0].id;
  }

  function frontierRest(task, settings, controls, plot) {  // the legend, the plot, the table
    const st = styles(settings);
    const legend = el("div", { class: "legend" }, ...st.strategies.map((s) =>
      el("span", {}, el("i", { style: `background:${st.colour(s)}` }), s)));
    if (st.models.length > 1) {
      legend.append(el("br"), ...st.models.map((m) => {
        const g = sv("svg", { width: 14, height: 14, viewBox: "0 0 14 14" });
        g.append(sv("path", { d: glyph(st.shape(m), 7, 7, 5), fill: "#555" }));
        return el("span", { class: "model" }, g, " " + m);
      }));
    }
    const front = (s) => [s.frontier ? "tokens" : "", s.frontier_flops ? "FLOPs" : ""].filter((x) => x).join(", ");
    const rows = settings.slice().sort((a, b) => a.model.localeCompare(b.model) || a.generated_tokens - b.generated_tokens)
      .map((s) => el("tr", { "data-setting": s.id }, el("td", { text: s.model }),
        el("td", {}, el("a", { href: problemsHash(task, { a: s.id, b: partnerOf(s, settings) }), text: s.short,
                                title: s.label })),
        el("td", { class: "num", text: fmt(s.accuracy, 3) }),
        el("td", { class: "num", text: `${fmt(s.ci95[0], 3)}-${fmt(s.ci95[1], 3)}` }),
        el("td", { class: "num", text: `${s.correct}/${s.problems}` }),
        el("td", { class: "num", text: fmt(s.generated_tokens) }), el("td", { class: "num", text: sci(s.flops) }),
        el("td", { class: "frontier-cell", text: front(s) })));
    const table = el("table", { id: "settings-" + task },
      el("tr", {}, ...["model", "setting", "accuracy", "95% CI", "right", "gen. tokens", "FLOPs", "frontier (by)"]
        .map((h) => el("th", { text: h }))), ...rows);
    return [controls, legend, plot,
            el("p", { class: "muted", text: "Dashed gold: each model's frontier (no setting of that model is more " +
              "accurate for less compute); marker shape: the model; rings: settings that fall on the same spot. " +
              "Hover a point for its figures; click it for its problems." }), table];
  }

  function live(task, settings) {  // requests ponder serve kept: no answer key, so no accuracy
    const rows = settings.map((s) => el("tr", {}, el("td", {}, el("a", { href: problemsHash(task, { a: s.id }),
      text: s.short, title: s.label })), el("td", { class: "num", text: s.problems }),
      el("td", { class: "num", text: fmt(s.generated_tokens) }), el("td", { class: "num", text: sci(s.flops) })));
    return [el("h2", { text: `${task}: requests served with trace: true` }),
      el("table", { id: "settings-" + task }, el("tr", {}, ...["strategy", "outputs", "gen. tokens", "FLOPs"]
        .map((h) => el("th", { text: h }))), ...rows)];
  }

  // -- problems: one row per problem, one column per setting -------------------------------
  function problemsHash(task, state) {
    const q = new URLSearchParams(Object.entries(state).filter(([, v]) => v !== undefined && v !== null && v !== ""));
    const qs = q.toString();
    return `#/problems/${enc(task)}` + (qs ? "?" + qs : "");
  }

  async function problems(task, query) {
    const t = DATA.tasks[task];
    if (!t) return problemPage(`The store has no task ${JSON.stringify(task)}; its tasks: ` +
      Object.keys(DATA.tasks).join(", "));
    const byId = Object.fromEntries(t.settings.map((s) => [s.id, s]));
    const want = { a: query.get("a"), b: query.get("b"), rel: query.get("rel") || "all", sort: query.get("sort") || "id",
                   only: query.get("only") === "1" };
    if (want.a && !byId[want.a]) return problemPage(`Task ${task} has no setting ${JSON.stringify(want.a)}.`);
    if (want.b && !byId[want.b]) return problemPage(`Task ${task} has no setting ${JSON.stringify(want.b)}.`);
    app.replaceChildren(el("p", { class: "muted", text: "loading the problems..." }));
    let list;
    try { list = await problemsOf(task); } catch (e) { return problemPage(e.message); }
    const many = new Set(t.settings.map((s) => s.model)).size > 1;
    const name = (s) => (many ? s.model + ": " : "") + s.short;
    const opts = (sel) => t.settings.map((s) => el("option", { value: s.id, text: name(s), title: s.label,
                                                             ...(s.id === sel ? { selected: "" } : {}) }));
    const a0 = want.a || t.settings[0].id;
    const a = el("select", { id: "setting-a", class: "setting" }, ...opts(a0));
    const b = el("select", { id: "setting-b", class: "setting" }, ...opts(want.b || partnerOf(byId[a0], t.settings)));
    const rel = el("select", { id: "relation" }, ...[["all", "all problems"], ["aw", "A right, B wrong"],
      ["wa", "A wrong, B right"], ["rr", "both right"], ["ww", "both wrong"], ["a", "A right"], ["na", "A wrong"]]
      .map(([v, l]) => el("option", { value: v, text: l, ...(v === want.rel ? { selected: "" } : {}) })));
    const sort = el("select", { id: "sort" }, ...[["id", "by problem"], ["hard", "hardest first (samples agree least)"],
      ["easy", "easiest first"]].map(([v, l]) => el("option", { value: v, text: l, ...(v === want.sort ? { selected: "" } : {}) })));
    const only = el("input", { type: "checkbox", id: "only-ab", ...(want.only ? { checked: "" } : {}) });
    const summary = el("div", { id: "summary" });
    const holder = el("div", { class: "grid-wrap" });
    const draw = () => {
      const A = a.value, B = b.value, r = rel.value;
      const ok = (p, id) => p.cells[id] && p.cells[id].correct;
      const keep = (p) => ({ all: true, aw: ok(p, A) && !ok(p, B), wa: !ok(p, A) && ok(p, B), rr: ok(p, A) && ok(p, B),
                             ww: !ok(p, A) && !ok(p, B), a: ok(p, A), na: !ok(p, A) }[r]);
      let shown = list.filter(keep);
      if (sort.value !== "id") shown = shown.slice().sort((x, y) => (sort.value === "hard" ? 1 : -1) *
        (x.agreement - y.agreement));
      const cols = only.checked ? [...new Set([A, B])].map((id) => byId[id]) : t.settings;
      const sa = byId[A], inA = list.filter((p) => p.cells[A]);
      summary.replaceChildren(el("b", { text: sa.label }), ` (${sa.model}) - ${inA.length} problems, ` +
        (t.judged ? `${inA.filter((p) => p.cells[A].correct).length} right (accuracy ${fmt(sa.accuracy, 3)}); `
                  : "not judged (live requests); ") + `${shown.length} shown`);
      summary.dataset.setting = A;
      summary.dataset.b = B;
      summary.dataset.problems = inA.length;
      summary.dataset.correct = inA.filter((p) => p.cells[A].correct).length;
      summary.dataset.shown = shown.length;
      const head = el("tr", {}, el("th", { text: "problem" }), el("th", { text: "gold" }), el("th", { text: "agreement" }),
        ...cols.map((s) => el("th", { text: name(s), title: s.label, class: "setting-head" })));
      const body = shown.map((p) => el("tr", { "data-problem": p.id },
        el("td", {}, el("a", { href: `#/p/${enc(task)}/${enc(p.id)}`, text: p.id, title: p.question || "" })),
        el("td", { text: p.gold === null || p.gold === undefined ? "" : p.gold }),
        el("td", { class: "num", text: fmt(p.agreement, 2) }),
        ...cols.map((s) => {
          const c = p.cells[s.id];
          if (!c) return el("td", { class: "muted", text: "-" });
          const m = c.correct === null ? "\u00b7" : mark(c.correct);
          return el("td", { class: "cell " + (c.correct === null ? "" : c.correct ? "right" : "wrong"),
                            "data-setting": s.id },
            el("a", { href: `#/g/${enc(c.key)}`, title: "open this generation",
                      text: `${m} ${c.answer === null ? "(none)" : c.answer} \u00b7 ${c.generated_tokens} tok` }));
        })));
      holder.replaceChildren(el("table", { id: "problems" }, head, ...body));
      // the choice lives in the URL: Back, reload and a shared link give this same table
      const hash = problemsHash(task, { a: A, b: B, rel: r === "all" ? "" : r, sort: sort.value === "id" ? "" : sort.value,
                                        only: only.checked ? "1" : "" });
      if (location.hash !== hash) history.replaceState(null, "", hash);
    };
    for (const c of [a, b, rel, sort, only]) c.addEventListener("change", draw);
    page(`${task}: problems`, el("div", { class: "controls" }, "A", a, "B", b, rel, sort,
      el("label", {}, only, " only A and B")), summary, holder);
    draw();
  }

  async function oneProblem(task, pid) {
    const t = DATA.tasks[task];
    if (!t) return problemPage(`The store has no task ${JSON.stringify(task)}; its tasks: ` +
      Object.keys(DATA.tasks).join(", "));
    let list;
    try { list = await problemsOf(task); } catch (e) { return problemPage(e.message); }
    const p = list.find((q) => q.id === pid);
    if (!p) return problemPage(`The store has no problem ${JSON.stringify(pid)} in task ${JSON.stringify(task)}; ` +
      "open the problems table to pick one.");
    const rows = t.settings.filter((s) => p.cells[s.id]).map((s) => {
      const c = p.cells[s.id];
      return el("tr", {}, el("td", { text: s.model }), el("td", {}, el("a", { href: `#/g/${enc(c.key)}`, text: s.short,
                                                                              title: s.label })),
        el("td", { class: c.correct === null ? "" : c.correct ? "right" : "wrong",
                   text: c.correct === null ? "not judged" : c.correct ? "right" : "wrong" }),
        el("td", { text: c.answer === null ? "(none)" : c.answer }), el("td", { class: "num", text: c.generated_tokens }));
    });
    page(`${task}: problem ${pid}`, ...questionBlock(p.question, p.gold),
      el("p", { text: `agreement ${fmt(p.agreement, 2)}` }),
      el("table", {}, el("tr", {}, ...["model", "setting", "", "answer", "gen. tokens"].map((h) => el("th", { text: h }))),
        ...rows));
  }

  function questionBlock(question, gold) {  // what was asked and what is right, above every generation and tree
    const out = [];
    out.push(el("div", { class: "question", id: "question" }, el("b", { text: "question " }),
      question === null || question === undefined
        ? el("span", { class: "muted", text: "(not stored: a row written by an older ponder)" })
        : el("pre", { text: question })));
    if (gold !== null && gold !== undefined) {
      out.push(el("div", { class: "gold", id: "gold" }, el("b", { text: "gold answer " }), el("code", { text: gold })));
    }
    return out;
  }

  // -- one generation ---------------------------------------------------------------------
  async function generation(key) {
    treeCount = 0;  // the page's first tree is #tree
    app.replaceChildren(el("p", { class: "muted", text: "loading..." }));
    let g;
    try { g = await generationOf(key); } catch (e) { return problemPage(e.message); }
    if (!g) return problemPage(`No stored generation has the id ${JSON.stringify(key)}; ` +
      "open the problems table to pick one.");
    const head = el("table", { class: "summary" },
      ...[["task", g.task], ["problem", g.problem_id], ["strategy", g.strategy],
          ["setting", JSON.stringify(g.setting)], ["model", g.model],
          ["answer", `${g.answer === null ? "(none)" : g.answer} ` +
                     `(${g.correct === null ? "not judged" : g.correct ? "right" : "wrong"})`],
          ["tokens", `${g.usage.generated_tokens} generated, ${g.usage.computed_tokens} computed` +
                     (g.usage.prefix_cache_hit_tokens ? ` (${g.usage.prefix_cache_hit_tokens} read from the prefix cache)` : "") +
                     `, ${sci(g.usage.flops)} FLOPs, ${fmt(g.usage.wall_s, 3)} s`]]
        .map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: String(v) }))));
    const back = el("p", {}, el("a", { href: `#/p/${enc(g.task)}/${enc(g.problem_id)}`,
                                       text: "this problem in every setting" }));
    const parts = [back, ...questionBlock(g.question, g.gold), head];
    if (g.note) parts.push(el("div", { class: "note", id: "note", text: g.note }));
    if (g.kind === "tree") parts.push(...treeView(g.trace, g.chosen_path || [], g));
    else if (g.kind === "samples") parts.push(...samplesView(g));
    else if (g.kind === "tokens") parts.push(tokensView(g));
    else if (g.kind === "unknown") parts.push(el("pre", { id: "raw", text: JSON.stringify(g.trace, null, 1) }));
    else parts.push(el("h3", { text: "text" }), el("pre", { id: "text", text: g.text }),
      el("p", { class: "muted", text: "A token-level generation: the store keeps its text and bill." }));
    const m = Object.entries(g.meta || {}).filter(([k]) => !HIDDEN_META.has(k));
    if (m.length) parts.push(el("h3", { text: "meta" }), el("pre", { id: "meta", text: JSON.stringify(Object.fromEntries(m)) }));
    page(`${g.strategy} on ${g.problem_id}`, ...parts);
    for (const w of app.querySelectorAll(".tree-wrap")) w.dispatchEvent(new Event("ponder:drawn"));
  }

  function tokensView(g) {  // the text, each token shaded by how unlikely the model found it
    const spans = g.trace.tokens.map((t, i) => {
      const p = Math.exp(t.lp);
      const s = el("span", { class: "tok", "data-i": i, "data-p": p.toFixed(4),
                             style: `background: rgba(214, 39, 40, ${(0.85 * (1 - p)).toFixed(3)})`, text: t.t });
      s.addEventListener("mousemove", (ev) => showTip(ev, [`${JSON.stringify(t.t)}: p = ${p.toFixed(3)} ` +
        `(log ${t.lp.toFixed(3)})`, ...(t.top || []).map(([a, b]) => `  ${JSON.stringify(a)}: ${Math.exp(b).toFixed(3)}`)]));
      s.addEventListener("mouseleave", hideTip);
      return s;
    });
    const low = g.trace.tokens.filter((t) => Math.exp(t.lp) < 0.5).length;
    const parts = [el("h3", { text: `${g.trace.tokens.length} tokens` }),
      el("p", { class: "muted", text: `Shaded by the model's probability of each token (white: sure; red: ` +
        `unlikely; ${low} below 0.5). Hover for its log-probability` +
        (g.trace.tokens.some((t) => t.top) ? " and the alternatives." : ".") }),
      el("pre", { id: "tokens", class: "tokens" }, ...spans)];
    const rounds = g.trace.rounds || [];
    if (rounds.length) {  // speculative decoding: each round's drafts, kept or thrown away, and the target's token
      const acc = rounds.reduce((n, r) => n + r.accepted.length, 0);
      const all = rounds.reduce((n, r) => n + r.accepted.length + r.rejected.length, 0);
      parts.push(el("h3", { text: `${rounds.length} speculative rounds: ${acc} of ${all} drafted tokens accepted` }),
        el("p", { class: "muted", text: "Green: drafts the target accepted; struck red: drafts it rejected; " +
          "blue: the token the target added." }),
        el("div", { id: "drafts" }, ...rounds.map((r, i) => el("div", { class: "round", "data-i": i },
          el("span", { class: "muted", text: `${i + 1}. ` }),
          ...r.accepted.map((t) => el("span", { class: "acc", text: t })),
          ...r.rejected.map((t) => el("span", { class: "rej", text: t })),
          el("span", { class: "tgt", text: r.added })))));
    }
    return el("div", {}, ...parts);
  }

  function policyReason(g) {  // compute-optimal: which strategy ran, and the rule that chose it
    const m = g.meta || {};
    if (m.chose === undefined) return null;
    const pol = String((g.setting || {}).policy || "");
    const bins = pol.split(",").map((x) => x.split(":")).filter((x) => x.length === 2)
      .map(([t, n]) => [Number(t), n.trim()]).filter(([t]) => isFinite(t));
    const d = Number(m.difficulty);
    let rule = "";
    if (bins.length && isFinite(d)) {
      const i = bins.findIndex(([t]) => d <= t);
      if (i >= 0) rule = ` because the probe's difficulty ${fmt(d, 3)} is in (${i ? bins[i - 1][0] : 0}, ${bins[i][0]}], ` +
        `which the policy ${JSON.stringify(pol)} gives to ${bins[i][1]}`;
    } else if (isFinite(d)) rule = ` (the probe's difficulty: ${fmt(d, 3)})`;
    return m.chose === "probe" ? `The policy answered from the probe${rule}.` : `The policy ran ${m.chose}${rule}.`;
  }

  function samplesView(g) {
    const votes = (g.meta || {}).votes || {};
    const meta = g.meta || {};
    const stoppedAt = meta.stopped_at || [], conf = meta.confidence || [];
    const online = g.strategy === "deepconf-online" || stoppedAt.length > 0;
    const why = g.chosen === null || g.chosen === undefined ? "" : {
      "majority": "the first sample of the answer with the most votes",
      "weighted-majority": "the first sample of the answer with the largest summed reward",
      "adaptive-majority": "the vote's leader when sampling stopped",
      "best-of-n": "the sample the reward model scored highest",
      "deepconf": "the first sample of the answer with the largest confidence-weighted vote",
      "deepconf-online": "the first sample of the answer with the largest confidence-weighted vote",
    }[g.strategy] || "the sample the strategy returned";
    const heads = ["#", "answer", "", "votes", "score", "tokens", ...(online ? ["stopped at", "confidence"] : []),
                   "meta", "text"];
    const rows = g.trace.map((s, i) => el("tr", { class: (i === g.chosen ? "chosen sample" : "sample") +
                                                         (online && stoppedAt[i] !== null && stoppedAt[i] !== undefined ? " stopped" : ""),
                                                 "data-i": i },
      el("td", { class: "num", text: i + 1 }), el("td", { text: s.answer === null || s.answer === undefined ? "" : s.answer }),
      el("td", { class: s.correct === true ? "right" : s.correct === false ? "wrong" : "", text: mark(s.correct) }),
      el("td", { class: "num", text: s.answer !== null && votes[s.answer] !== undefined ? fmt(votes[s.answer], 2) : "" }),
      el("td", { class: "num", text: s.score === null || s.score === undefined ? "" : fmt(s.score, 3) }),
      el("td", { class: "num", text: (s.usage || {}).generated_tokens }),
      ...(online ? [el("td", { class: "num", text: stoppedAt[i] === null || stoppedAt[i] === undefined ? "" :
                                                   `token ${stoppedAt[i]}` }),
                    el("td", { class: "num", text: conf[i] === null || conf[i] === undefined ? "" : fmt(conf[i], 3) })] : []),
      el("td", { text: Object.entries(s.meta || {}).filter(([k]) => !HIDDEN_META.has(k))
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ") }),
      el("td", {}, el("code", { text: s.text.trim().replace(/\n/g, " \u21b5 ") }))));
    const reason = policyReason(g);
    const chosenText = g.chosen === null || g.chosen === undefined ? "The answer is not one of the samples."
      : reason ? `Chosen: sample ${g.chosen + 1}. ${reason}`
      : `Chosen: sample ${g.chosen + 1}, ${why}.`;
    const out = [el("h3", { text: `${g.trace.length} samples` }),
      el("p", { id: "why", "data-chosen": g.chosen === null || g.chosen === undefined ? "" : g.chosen,
                "data-by": g.chosen_by || "", text: chosenText })];
    if (online) out.push(el("p", { class: "muted", id: "stopped-note", text: `${stoppedAt.filter((x) => x !== null && x !== undefined).length} ` +
      `of ${g.trace.length} traces were stopped early (struck through): their confidence fell below the threshold ` +
      `${fmt(meta.threshold, 3)}, so they do not vote.` }));
    out.push(el("table", { id: "samples" }, el("tr", {}, ...heads.map((h) => el("th", { text: h }))), ...rows));
    g.trace.forEach((s, i) => {  // a sample that is itself a search (compute-optimal's probe): its tree
      if (s.tree) out.push(el("h3", { text: `sample ${i + 1}: ${(s.meta || {}).strategy || "the probe"}'s search` }),
        ...treeView(s.tree, s.chosen_path || [], { meta: s.meta, strategy: (s.meta || {}).strategy, question: g.question }));
    });
    return out;
  }

  // -- the tree ---------------------------------------------------------------------------
  // Drawn for 20,000 nodes in well under a second: the layout is computed once; nodes are
  // zero-length strokes with round caps in one group whose transform carries the zoom, so a
  // node stays a round dot of fixed size however the x and y scales differ; labels are drawn
  // only for the nodes in view, and only when rows are far enough apart to read them.
  let treeCount = 0;
  function treeView(root, chosenPath, g) {
    const uid = "tree" + (treeCount++ ? treeCount : "");
    const chosen = new Set(chosenPath);
    const collapsed = new Set();
    const byId = new Map(), byKey = new Map(), parent = new Map(), order = [];
    const stack = [[root, null, ""]];
    while (stack.length) {  // index the tree (iteratively: deep trees must not overflow the stack)
      const [n, p, before] = stack.pop();
      if (!Array.isArray(n.children)) n.children = [];
      byId.set(n.id, n);
      byKey.set(String(n.id), n);
      parent.set(n.id, p);
      n._path = before + (n.step || "");
      n._depth = p ? p._depth + 1 : 0;
      order.push(n.id);
      for (let i = n.children.length - 1; i >= 0; i--) stack.push([n.children[i], n, n._path]);
    }
    // replay order: the order the search made its nodes (ids count up as nodes are made)
    const numeric = order.every((id) => typeof id === "number");
    const ids = numeric ? order.slice().sort((a, b) => a - b) : order;
    const rank = new Map(ids.map((id, i) => [id, i]));
    const maxRank = ids.length - 1;
    const mcts = (g && g.strategy === "mcts") || [...byId.values()].some((n) => (n.visits || 0) > 1);
    const DX = 170, DY = 22;
    const wrap = el("div", { class: "tree-wrap" });
    const svg = sv("svg", { class: "tree-svg", id: uid, "data-nodes": byId.size });
    const layer = sv("g", {}), labels = sv("g", { class: "labels" });
    svg.append(layer, labels);
    wrap.append(svg);
    const detail = el("div", { class: "detail", id: uid === "tree" ? "detail" : uid + "-detail" }, el("p", { class: "muted",
      text: "Click a node for its path, score and bill. Wheel: zoom (shift: rows only); drag: pan; shift-click: fold." }));
    let view = { sx: 1, sy: 1, x: -20, y: -20 };  // screen = (pos - view.xy) * scale
    let pos = new Map(), limit = maxRank, query = "", minScore = null, maxDepth = null;

    function layout() {
      pos = new Map();
      let leaf = 0;
      const st = [[root, false]];
      while (st.length) {  // post-order: leaves take rows, a parent sits between its children
        const [n, done] = st.pop();
        const kids = collapsed.has(n.id) ? [] : n.children.filter((c) => rank.get(c.id) <= limit);
        if (!kids.length) { pos.set(n.id, { x: n._depth * DX, y: leaf++ * DY }); continue; }
        if (done) {
          const ys = kids.map((c) => pos.get(c.id).y);
          pos.set(n.id, { x: n._depth * DX, y: (Math.min(...ys) + Math.max(...ys)) / 2 });
          continue;
        }
        st.push([n, true]);
        for (let i = kids.length - 1; i >= 0; i--) st.push([kids[i], false]);
      }
    }
    const isPruned = (n) => !n.terminal && !n.children.length && parent.get(n.id) !== null &&
      !(n.rollouts || []).length && !chosen.has(n.id);
    function draw() {
      layout();
      const edges = [], gold = [], nodes = [];
      for (const [id, p] of pos) {
        const n = byId.get(id), par = parent.get(id);
        if (par && pos.has(par.id)) {
          const q = pos.get(par.id), mx = (q.x + p.x) / 2;
          (chosen.has(id) && chosen.has(par.id) ? gold : edges).push(`M${q.x},${q.y}C${mx},${q.y} ${mx},${p.y} ${p.x},${p.y}`);
        }
        const cls = ["node", n.terminal ? "terminal" : "", isPruned(n) ? "pruned" : "", chosen.has(id) ? "chosen" : "",
                     n.finish === "rejected" ? "rejected" : "", collapsed.has(id) ? "collapsed" : "",
                     (n.drafts || []).length ? "rewritten" : "", n.correct === true ? "right" : n.correct === false ? "wrong" : "",
                     dim(n) ? "dim" : "", hit(n) ? "hit" : ""].filter((c) => c).join(" ");
        const fill = par === null ? "#555" : scoreColour(n.score);
        const cap = n.terminal ? "square" : "round";
        // a ring only where the node has something to say (chosen, judged, rewritten, found):
        // half the elements on a big tree
        const halo = /chosen|right|wrong|rewritten|hit/.test(cls) ? `<path class="halo" d="M${p.x},${p.y}h0"/>` : "";
        nodes.push(`<g class="${cls}" data-id="${typeof id === "number" ? id : esc(id)}">${halo}` +
                   `<path class="shape" d="M${p.x},${p.y}h0" stroke="${fill}" stroke-linecap="${cap}"/></g>`);
      }
      layer.innerHTML = `<path class="edge" d="${edges.join("")}"/><path class="edge chosen" d="${gold.join("")}"/>` +
        nodes.join("");
      apply();
    }
    const dim = (n) => (minScore !== null && n.score !== null && n.score !== undefined && n.score < minScore) ||
      (maxDepth !== null && n._depth > maxDepth);
    const hit = (n) => query !== "" && (n.step || "").toLowerCase().includes(query);
    let pending = false;
    function apply() {  // the zoom moves one group; the labels follow on the next frame
      layer.setAttribute("transform", `matrix(${view.sx} 0 0 ${view.sy} ${-view.x * view.sx} ${-view.y * view.sy})`);
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; drawLabels(); }); }
    }
    function drawLabels() {  // level of detail: labels where rows are at least 11 px apart, for nodes in view
      const r = svg.getBoundingClientRect();
      const rowPx = DY * view.sy, colPx = DX * view.sx;
      if (rowPx < 11 || colPx < 40) { labels.innerHTML = ""; svg.dataset.labels = 0; return; }
      const room = Math.max(3, Math.floor((colPx - 16) / 6.6));
      const out = [];
      for (const [id, p] of pos) {
        const X = (p.x - view.x) * view.sx, Y = (p.y - view.y) * view.sy;
        if (X < -200 || X > r.width || Y < -10 || Y > r.height + 10) continue;
        const n = byId.get(id);
        const step = (parent.get(id) === null ? (g && g.question ? g.question : "question") : (n.step || ""))
          .replace(/\n/g, " ").trim();
        let text = step.length > room ? step.slice(0, room - 1) + "\u2026" : step;
        if (n.correct !== undefined && n.correct !== null) text = mark(n.correct) + " " + text;
        if (n.visits && !mcts) text += ` n=${n.visits}`;
        if (collapsed.has(id)) text += ` [+${count(n) - 1}]`;
        out.push(`<text x="${X + 9}" y="${Y + 4}">${esc(text)}</text>`);
        const par = parent.get(id);
        if (mcts && par && pos.has(par.id) && rowPx >= 16) {  // MCTS: each edge's visits and mean value
          const q = pos.get(par.id);
          const ex = ((q.x + p.x) / 2 - view.x) * view.sx, ey = (p.y - view.y) * view.sy;
          out.push(`<text class="edge-label" x="${ex - 30}" y="${ey - 3}">N ${n.visits || 0} Q ${fmt(n.value, 2)}</text>`);
        }
        if (out.length > 3000) break;
      }
      labels.innerHTML = out.join("");
      svg.dataset.labels = out.length;
    }
    function count(n) { let k = 0; const st = [n]; while (st.length) { const m = st.pop(); k++; st.push(...m.children); } return k; }
    function show(n) {
      const u = n.usage || {};
      const isRoot = parent.get(n.id) === null;
      const kids = [el("h3", { text: isRoot ? "the question" : `step at depth ${n._depth} (node ${n.id})` })];
      if (isRoot) kids.push(el("pre", { class: "path", text: g && g.question ? g.question : "(the question was not stored)" }));
      else kids.push(el("div", { class: "muted", text: "the solution so far (this step last):" }),
        el("pre", { class: "path" }, el("span", { class: "muted", text: n._path.slice(0, n._path.length - (n.step || "").length) }),
          el("b", { text: n.step || "" })));
      if (n.correct !== undefined && n.correct !== null) kids.push(el("div", { class: n.correct ? "right" : "wrong",
        text: `path end: answer ${n.answer === null ? "(none)" : n.answer}, ${n.correct ? "right" : "wrong"}` }));
      kids.push(el("div", { text: `score ${fmt(n.score, 4)}; ${n.finish || "open"}${n.terminal ? " (terminal)" : ""}` +
          `${chosen.has(n.id) ? "; on the chosen path" : ""}` }),
        el("div", { text: `visits ${n.visits || 0}, value ${fmt(n.value, 3)}` }),
        el("div", { text: `bill: ${u.generated_tokens || 0} generated, ${u.computed_tokens || 0} computed tokens, ` +
          `${sci(u.flops || 0)} FLOPs` }));
      if ((n.drafts || []).length) kids.push(el("h4", { text: `the target rewrote ${n.drafts.length} draft(s) of this step` }),
        ...n.drafts.map((d) => el("pre", { text: `${fmt(d.score, 3)}${d.by ? " (" + d.by + ")" : ""}: ${d.step}` })));
      if ((n.rollouts || []).length) kids.push(el("h4", { text: `${n.rollouts.length} rollouts` }),
        ...n.rollouts.map((r) => el("pre", { text: `${fmt(r.score, 3)}: ${r.text}` })));
      if (n.children.length) kids.push(el("button", { text: collapsed.has(n.id) ? "unfold" : "fold", onclick: () => {
        collapsed.has(n.id) ? collapsed.delete(n.id) : collapsed.add(n.id); draw(); show(n); } }));
      detail.replaceChildren(...kids);
    }
    const bounds = () => {
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const p of pos.values()) { x0 = Math.min(x0, p.x); x1 = Math.max(x1, p.x); y0 = Math.min(y0, p.y); y1 = Math.max(y1, p.y); }
      return { x0, x1, y0, y1 };
    };
    function fit() {  // the whole tree in the box: x and y scaled each to fill it (a dot stays a dot)
      const r = svg.getBoundingClientRect(), b = bounds();
      const w = Math.max(1, r.width || 800), h = Math.max(1, r.height || 500);
      const sx = Math.min(1.2, Math.max(1e-4, (w - 200) / Math.max(DX, b.x1 - b.x0)));
      const sy = Math.min(1.2, Math.max(1e-4, (h - 30) / Math.max(DY, b.y1 - b.y0)));
      view = { sx, sy, x: b.x0 - 15 / sx, y: b.y0 - 15 / sy };
      apply();
    }
    function centreOn(id, rows = 14) {  // zoom so a few rows show, centred on a node
      const p = pos.get(id);
      if (!p) return;
      const r = svg.getBoundingClientRect();
      const sy = Math.max(view.sy, (r.height || 500) / (rows * DY)), sx = Math.max(view.sx, 0.8);
      view = { sx, sy, x: p.x - (r.width || 800) / 2 / sx, y: p.y - (r.height || 500) / 2 / sy };
      apply();
    }
    function follow() {  // fold everything off the chosen path, then show the path whole
      collapsed.clear();
      for (const [id, n] of byId) if (!chosen.has(id) && n.children.length) collapsed.add(id);
      draw();
      fit();
      const last = chosenPath[chosenPath.length - 1];
      if (last !== undefined && byId.has(last)) show(byId.get(last));
    }
    const nodeOf = (ev) => { const e = ev.target.closest && ev.target.closest("g.node"); return e ? byKey.get(e.dataset.id) : null; };
    svg.addEventListener("click", (ev) => {
      const n = nodeOf(ev);
      if (!n) return;
      if (ev.shiftKey && n.children.length) { collapsed.has(n.id) ? collapsed.delete(n.id) : collapsed.add(n.id); draw(); }
      else show(n);
    });
    svg.addEventListener("mousemove", (ev) => {
      if (drag) {
        view = { ...drag.v, x: drag.v.x - (ev.clientX - drag.x) / view.sx, y: drag.v.y - (ev.clientY - drag.y) / view.sy };
        apply();
        return;
      }
      const n = nodeOf(ev);
      if (!n) return hideTip();
      showTip(ev, [(n.step || "(the question)").trim().slice(0, 200), `score ${fmt(n.score, 3)}` +
        (n.visits ? `, ${n.visits} visits, Q ${fmt(n.value, 3)}` : ""),
        `${n.finish || "open"}${n.terminal ? ", terminal" : ""}` +
        (n.correct !== undefined && n.correct !== null ? (n.correct ? ", right" : ", wrong") : "") +
        ((n.drafts || []).length ? `, rewrote ${n.drafts.length} draft(s)` : "")]);
    });
    svg.addEventListener("mouseleave", () => { hideTip(); drag = null; });
    svg.addEventListener("wheel", (ev) => {  // zoom about the pointer; with shift, the rows only
      ev.preventDefault();
      const r = svg.getBoundingClientRect();
      const f = ev.deltaY < 0 ? 1.2 : 1 / 1.2;
      const px = view.x + (ev.clientX - r.left) / view.sx, py = view.y + (ev.clientY - r.top) / view.sy;
      const sx = ev.shiftKey ? view.sx : Math.max(1e-4, Math.min(6, view.sx * f));
      const sy = Math.max(1e-4, Math.min(6, view.sy * f));
      view = { sx, sy, x: px - (ev.clientX - r.left) / sx, y: py - (ev.clientY - r.top) / sy };
      apply();
    }, { passive: false });
    let drag = null;
    svg.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, v: { ...view } }; });
    svg.addEventListener("mouseup", () => { drag = null; });
    wrap.addEventListener("ponder:drawn", fit);
    draw();
    // find, filter and replay
    const found = el("span", { class: "muted found" });
    let hits = [], at = -1;
    const search = el("input", { type: "search", class: "node-search", placeholder: "find text in steps", size: 18 });
    search.addEventListener("input", () => {
      query = search.value.trim().toLowerCase();
      hits = query ? ids.filter((id) => hit(byId.get(id))) : [];
      at = -1;
      found.textContent = query ? `${hits.length} found` : "";
      draw();
    });
    search.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter" || !hits.length) return;
      at = (at + 1) % hits.length;
      let p = parent.get(hits[at]);  // unfold its ancestors so it is drawn
      while (p) { collapsed.delete(p.id); p = parent.get(p.id); }
      draw();
      centreOn(hits[at]);
      show(byId.get(hits[at]));
    });
    const score = el("input", { type: "number", class: "min-score", min: 0, max: 1, step: 0.05, placeholder: "score \u2265",
                                style: "width:6em" });
    const depth = el("input", { type: "number", class: "max-depth", min: 0, step: 1, placeholder: "depth \u2264",
                                style: "width:6em" });
    const refilter = () => { minScore = score.value === "" ? null : +score.value; maxDepth = depth.value === "" ? null : +depth.value; draw(); };
    score.addEventListener("input", refilter);
    depth.addEventListener("input", refilter);
    const slider = el("input", { type: "range", class: "replay", min: 0, max: ids.length - 1, value: ids.length - 1, step: 1 });
    const shown = el("span", { class: "muted replay-count", text: `${byId.size} of ${byId.size} nodes` });
    const replayTo = (k) => {
      limit = k;
      slider.value = k;
      shown.textContent = `${k + 1} of ${byId.size} nodes (in the order the search made them)`;
      draw();
    };
    slider.addEventListener("input", () => replayTo(+slider.value));
    let timer = null;
    const play = el("button", { class: "play", text: "\u25b6 replay", onclick: () => {
      if (timer) { clearInterval(timer); timer = null; play.textContent = "\u25b6 replay"; return; }
      let k = +slider.value >= ids.length - 1 ? 0 : +slider.value;
      play.textContent = "\u23f8 pause";
      const stepBy = Math.max(1, Math.ceil(ids.length / 200));
      timer = setInterval(() => {
        replayTo(Math.min(ids.length - 1, k));
        k += stepBy;
        if (k > ids.length - 1 + stepBy - 1 || !document.body.contains(slider)) {
          clearInterval(timer); timer = null; play.textContent = "\u25b6 replay";
        }
      }, 60);
    } });
    const controls = el("div", { class: "controls" },
      el("button", { id: uid === "tree" ? "follow" : uid + "-follow", text: "follow the chosen path", onclick: follow }),
      el("button", { id: uid === "tree" ? "unfold" : uid + "-unfold", text: "expand all", onclick: () => { collapsed.clear(); draw(); } }),
      el("button", { class: "collapse-all", text: "collapse all", onclick: () => {
        collapsed.clear();
        for (const [id, n] of byId) if (n.children.length && parent.get(id) !== null) collapsed.add(id);
        draw(); fit(); } }),
      el("button", { id: uid === "tree" ? "fit" : uid + "-fit", text: "fit", onclick: fit }),
      el("button", { text: "+", onclick: () => { view.sx *= 1.25; view.sy *= 1.25; apply(); } }),
      el("button", { text: "\u2212", onclick: () => { view.sx /= 1.25; view.sy /= 1.25; apply(); } }),
      search, found, score, depth);
    const replay = el("div", { class: "controls" }, play, slider, shown);
    const mctsNote = mcts ? "; edges: N visits, Q mean value" : "";
    const key = el("p", { class: "muted", text: `${byId.size} nodes (root included); colour: score, red 0 to green 1; ` +
      "squares end a path (ringed green: right, red: wrong); faded: pruned or rejected; gold: the chosen path; " +
      "purple ring: a step the target rewrote; blue ring: found" + mctsNote });
    return [el("h3", { text: "search tree" }), controls, replay, key, el("div", { class: "layout" }, wrap, detail)];
  }

  // -- routing ----------------------------------------------------------------------------
  function route() {
    hideTip();
    const raw = location.hash.replace(/^#\/?/, "") || "";
    const qi = raw.indexOf("?");
    const path = qi >= 0 ? raw.slice(0, qi) : raw;
    const query = new URLSearchParams(qi >= 0 ? raw.slice(qi + 1) : "");
    let parts;
    try { parts = path.split("/").filter((x) => x !== "").map(decodeURIComponent); } catch (e) { parts = ["?"]; }
    const t0 = performance.now();
    let done;
    try {
      if (!parts.length) done = overview();
      else if (parts[0] === "problems" && parts.length >= 2) {
        if (parts[2] && !query.get("a")) query.set("a", parts[2]);  // the older link form #/problems/TASK/ID
        done = problems(parts[1], query);
      }
      else if (parts[0] === "p" && parts.length === 3) done = oneProblem(parts[1], parts[2]);
      else if (parts[0] === "g" && parts.length === 2) done = generation(parts[1]);
      else done = problemPage(`There is no view ${JSON.stringify(location.hash)}; the views are the overview, ` +
        "a task's problems, one problem and one generation.");
    } catch (e) {
      done = problemPage(`This view failed on this store's data (${e.message}); the store may be from another ` +
        "ponder. The overview and other views may still work.");
    }
    // what the tests and benchmarks wait for: the view is drawn (after layout: the next frame)
    Promise.resolve(done).catch((e) => problemPage(`This view failed on this store's data (${e.message}).`))
      .then(() => requestAnimationFrame(() => {
        window.ponderRendered = { view: parts[0] || "overview", ms: performance.now() - t0, at: performance.now() };
      }));
  }
  window.addEventListener("hashchange", route);
  route();
})();
