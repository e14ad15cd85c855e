// ponder view: the page over a results store. Plain JavaScript and SVG, no library and
// no request outside the machine. Views by the URL's hash:
//   #/                      the frontier of every task
//   #/problems/TASK[/ID]    one row per problem, one column per setting (ID: a setting)
//   #/p/TASK/PROBLEM        one problem across the settings
//   #/g/KEY                 one generation: its samples, its tree, or its text
// The data is inlined in the page (script#ponder-data); a served page fetches each
// generation from /api/generation/KEY, an exported one has them all inline.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("ponder-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const app = document.getElementById("app");
  const tip = document.getElementById("tooltip");
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#7b4173", "#3182bd", "#e6550d"];

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
    tip.replaceChildren(...lines.map((l) => el("div", { text: l })));
    tip.style.display = "block";
    tip.style.left = Math.min(ev.clientX + 12, window.innerWidth - 300) + "px";
    tip.style.top = (ev.clientY + 12) + "px";
  }
  const hideTip = () => { tip.style.display = "none"; };
  const scoreColour = (s) => (s === null || s === undefined) ? "#bbb"
    : `hsl(${Math.round(120 * Math.max(0, Math.min(1, s)))}, 65%, 45%)`;

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

  function colours(settings) {  // one colour per strategy, the same in the plot and its legend
    const strategies = [...new Set(settings.map((s) => s.strategy))];
    return [strategies, (s) => PALETTE[strategies.indexOf(s) % PALETTE.length]];
  }

  function frontierPlot(task, settings, cost) {  // cost: "generated_tokens" or "flops", per problem, log scale
    const onFront = (s) => (cost === "flops" ? s.frontier_flops : s.frontier);
    const W = 760, H = 420, L = 56, R = 16, T = 16, B = 44;
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
    const [strategies, colour] = colours(settings);
    const front = settings.filter(onFront).sort((a, b) => a[cost] - b[cost]);
    if (front.length > 1) {
      svg.append(sv("polyline", { points: front.map((s) => `${X(s[cost])},${Y(s.accuracy)}`).join(" "),
                                  fill: "none", stroke: "#d4a017", "stroke-width": 2, "stroke-dasharray": "6 3" }));
    }
    const whiskers = sv("g", { "pointer-events": "none" }), points = sv("g", {});  // points above every interval
    svg.append(whiskers, points);
    const placed = [];  // points that would cover each other are set a few pixels apart, so each can be clicked
    for (const s of settings) {
      let x = X(s[cost]);
      const y = Y(s.accuracy);
      while (placed.some(([px, py]) => Math.abs(px - x) < 12 && Math.abs(py - y) < 12)) x += 12;
      placed.push([x, y]);
      whiskers.append(sv("line", { x1: x, x2: x, y1: Y(s.ci95[0]), y2: Y(s.ci95[1]), stroke: colour(s.strategy),
                                   "stroke-opacity": 0.5 }));
      const c = sv("circle", { cx: x, cy: y, r: onFront(s) ? 7 : 5, fill: colour(s.strategy),
                               class: "point", "data-setting": s.id, "data-frontier": onFront(s) ? "1" : "0" });
      c.addEventListener("mousemove", (ev) => showTip(ev, [s.label, s.model,
        `accuracy ${fmt(s.accuracy, 3)} [${fmt(s.ci95[0], 3)}, ${fmt(s.ci95[1], 3)}] (${s.correct}/${s.problems})`,
        `${fmt(s.generated_tokens)} generated tokens, ${sci(s.flops)} FLOPs per problem`,
        onFront(s) ? "on the frontier" : "", "click: its problems"]));
      c.addEventListener("mouseleave", hideTip);
      c.addEventListener("click", () => { hideTip(); location.hash = `#/problems/${enc(task)}/${enc(s.id)}`; });
      points.append(c);
    }
    return svg;
  }

  function frontierRest(task, settings, controls, plot) {  // the legend, the plot, the table
    const [strategies, colour] = colours(settings);
    const legend = el("div", { class: "legend" }, ...strategies.map((s) =>
      el("span", {}, el("i", { style: `background:${colour(s)}` }), s)));
    const rows = settings.slice().sort((a, b) => a.generated_tokens - b.generated_tokens).map((s) =>
      el("tr", {}, el("td", {}, el("a", { href: `#/problems/${enc(task)}/${enc(s.id)}`, text: s.label })),
        el("td", { class: "num", text: fmt(s.accuracy, 3) }),
        el("td", { class: "num", text: `${fmt(s.ci95[0], 3)}-${fmt(s.ci95[1], 3)}` }),
        el("td", { class: "num", text: `${s.correct}/${s.problems}` }),
        el("td", { class: "num", text: fmt(s.generated_tokens) }), el("td", { class: "num", text: sci(s.flops) }),
        el("td", { text: s.frontier ? "yes" : "" })));
    const table = el("table", { id: "settings-" + task },
      el("tr", {}, ...["setting", "accuracy", "95% CI", "right", "gen. tokens", "FLOPs", "frontier"].map((h) =>
        el("th", { text: h }))), ...rows);
    return [controls, legend, plot,
            el("p", { class: "muted", text: "Dashed gold: the frontier (no setting is more accurate for less " +
              "compute). Hover a point for its figures; click it for its problems." }), table];
  }

  function live(task, settings) {  // requests ponder serve kept: no answer key, so no accuracy
    const rows = settings.map((s) => el("tr", {}, el("td", {}, el("a", { href: `#/problems/${enc(task)}/${enc(s.id)}`,
      text: s.label })), el("td", { class: "num", text: s.problems }), el("td", { class: "num", text: fmt(s.generated_tokens) }),
      el("td", { class: "num", text: sci(s.flops) })));
    return [el("h2", { text: `${task}: requests served with trace: true` }),
      el("table", { id: "settings-" + task }, el("tr", {}, ...["strategy", "outputs", "gen. tokens", "FLOPs"]
        .map((h) => el("th", { text: h }))), ...rows)];
  }

  // -- problems: one row per problem, one column per setting -------------------------------
  function problems(task, sid) {
    const t = DATA.tasks[task];
    if (!t) return problemPage(`The store has no task ${JSON.stringify(task)}; its tasks: ` +
      Object.keys(DATA.tasks).join(", "));
    const byId = Object.fromEntries(t.settings.map((s) => [s.id, s]));
    if (sid && !byId[sid]) return problemPage(`Task ${task} has no setting ${JSON.stringify(sid)}.`);
    const opts = (sel) => t.settings.map((s) => el("option", { value: s.id, text: s.label,
                                                             ...(s.id === sel ? { selected: "" } : {}) }));
    const a = el("select", { id: "setting-a" }, ...opts(sid || t.settings[0].id));
    const b = el("select", { id: "setting-b" }, ...opts(t.settings[Math.min(1, t.settings.length - 1)].id));
    const rel = el("select", { id: "relation" }, ...[["all", "all problems"], ["aw", "A right, B wrong"],
      ["wa", "A wrong, B right"], ["rr", "both right"], ["ww", "both wrong"], ["a", "A right"], ["na", "A wrong"]]
      .map(([v, l]) => el("option", { value: v, text: l })));
    const sort = el("select", { id: "sort" }, el("option", { value: "id", text: "by problem" }),
      el("option", { value: "hard", text: "hardest first (samples agree least)" }),
      el("option", { value: "easy", text: "easiest first" }));
    const only = el("input", { type: "checkbox", id: "only-ab", ...(sid ? { checked: "" } : {}) });
    const summary = el("div", { id: "summary" });
    const holder = el("div");
    const draw = () => {
      const A = a.value, B = b.value, r = rel.value;
      const ok = (p, id) => p.cells[id] && p.cells[id].correct;
      const keep = (p) => ({ all: true, aw: ok(p, A) && !ok(p, B), wa: !ok(p, A) && ok(p, B), rr: ok(p, A) && ok(p, B),
                             ww: !ok(p, A) && !ok(p, B), a: ok(p, A), na: !ok(p, A) }[r]);
      let list = t.problems.filter(keep);
      if (sort.value !== "id") list = list.slice().sort((x, y) => (sort.value === "hard" ? 1 : -1) *
        (x.agreement - y.agreement));
      const cols = only.checked ? [...new Set([A, B])].map((id) => byId[id]) : t.settings;
      const sa = byId[A], inA = t.problems.filter((p) => p.cells[A]);
      summary.replaceChildren(el("b", { text: sa.label }), ` - ${inA.length} problems, ` +
        (t.judged ? `${inA.filter((p) => p.cells[A].correct).length} right (accuracy ${fmt(sa.accuracy, 3)}); `
                  : "not judged (live requests); ") + `${list.length} shown`);
      summary.dataset.setting = A;
      summary.dataset.problems = inA.length;
      summary.dataset.correct = inA.filter((p) => p.cells[A].correct).length;
      summary.dataset.shown = list.length;
      const head = el("tr", {}, el("th", { text: "problem" }), el("th", { text: "agreement" }),
        ...cols.map((s) => el("th", { text: s.label })));
      const body = list.map((p) => el("tr", { "data-problem": p.id },
        el("td", {}, el("a", { href: `#/p/${enc(task)}/${enc(p.id)}`, text: p.id })),
        el("td", { class: "num", text: fmt(p.agreement, 2) }),
        ...cols.map((s) => {
          const c = p.cells[s.id];
          if (!c) return el("td", { class: "muted", text: "-" });
          const mark = c.correct === null ? "\u00b7" : c.correct ? "\u2713" : "\u2717";
          return el("td", { class: "cell " + (c.correct === null ? "" : c.correct ? "right" : "wrong"),
                            "data-setting": s.id },
            el("a", { href: `#/g/${enc(c.key)}`, title: "open this generation",
                      text: `${mark} ${c.answer === null ? "(none)" : c.answer} \u00b7 ` +
                            `${c.generated_tokens} tok` }));
        })));
      holder.replaceChildren(el("table", { id: "problems" }, head, ...body));
    };
    for (const c of [a, b, rel, sort, only]) c.addEventListener("change", draw);
    page(`${task}: problems`, el("div", { class: "controls" }, "A", a, "B", b, rel, sort,
      el("label", {}, only, " only A and B")), summary, holder);
    draw();
  }

  function oneProblem(task, pid) {
    const t = DATA.tasks[task];
    const p = t && t.problems.find((q) => q.id === pid);
    if (!p) return problemPage(`The store has no problem ${JSON.stringify(pid)} in task ${JSON.stringify(task)}; ` +
      "open the problems table to pick one.");
    const rows = t.settings.filter((s) => p.cells[s.id]).map((s) => {
      const c = p.cells[s.id];
      return el("tr", {}, el("td", {}, el("a", { href: `#/g/${enc(c.key)}`, text: s.label })),
        el("td", { class: c.correct === null ? "" : c.correct ? "right" : "wrong",
                   text: c.correct === null ? "not judged" : c.correct ? "right" : "wrong" }),
        el("td", { text: c.answer === null ? "(none)" : c.answer }), el("td", { class: "num", text: c.generated_tokens }));
    });
    page(`${task}: problem ${pid}`, el("p", { text: `agreement ${fmt(p.agreement, 2)}` }),
      el("table", {}, el("tr", {}, ...["setting", "", "answer", "gen. tokens"].map((h) => el("th", { text: h }))),
        ...rows));
  }

  // -- one generation ---------------------------------------------------------------------
  async function generation(key) {
    let g = DATA.generations && DATA.generations[key];
    if (!g && DATA.mode === "serve") {
      app.replaceChildren(el("p", { class: "muted", text: "loading..." }));
      let r;
      try { r = await fetch("api/generation/" + enc(key)); } catch (e) {
        return problemPage("The ponder view server did not answer; is it still running?");
      }
      const body = await r.json().catch(() => ({ error: `the server answered ${r.status}` }));
      if (!r.ok) return problemPage(body.error || `the server answered ${r.status}`);
      g = body;
    }
    if (!g) return problemPage(`No stored generation has the id ${JSON.stringify(key)}; ` +
      "open the problems table to pick one.");
    const head = el("table", { class: "summary" },
      ...[["task", g.task], ["problem", g.problem_id], ["strategy", g.strategy],
          ["setting", JSON.stringify(g.setting)], ["model", g.model],
          ["answer", `${g.answer === null ? "(none)" : g.answer} ` +
                     `(${g.correct === null ? "not judged" : g.correct ? "right" : "wrong"})`],
          ["tokens", `${g.usage.generated_tokens} generated, ${g.usage.computed_tokens} computed, ` +
                     `${sci(g.usage.flops)} FLOPs, ${fmt(g.usage.wall_s, 3)} s`]]
        .map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: String(v) }))));
    const back = el("p", {}, el("a", { href: `#/p/${enc(g.task)}/${enc(g.problem_id)}`,
                                       text: "this problem in every setting" }));
    const parts = [back, head];
    if (g.note) parts.push(el("div", { class: "note", id: "note", text: g.note }));
    if (g.kind === "tree") parts.push(...treeView(g));
    else if (g.kind === "samples") parts.push(samplesView(g));
    else if (g.kind === "tokens") parts.push(tokensView(g));
    else if (g.kind === "unknown") parts.push(el("pre", { id: "raw", text: JSON.stringify(g.trace, null, 1) }));
    else parts.push(el("h3", { text: "text" }), el("pre", { id: "text", text: g.text }),
      el("p", { class: "muted", text: "A token-level generation: the store keeps its text and bill." }));
    const m = Object.entries(g.meta || {}).filter(([k]) => k !== "votes");
    if (m.length) parts.push(el("h3", { text: "meta" }), el("pre", { text: JSON.stringify(Object.fromEntries(m)) }));
    page(`${g.strategy} on ${g.problem_id}`, ...parts);
    const w = app.querySelector(".tree-wrap");
    if (w) w.dispatchEvent(new Event("ponder:drawn"));
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

  function samplesView(g) {
    const votes = (g.meta || {}).votes || {};
    const why = g.chosen === null ? "" : {
      "majority": "the first sample of the answer with the most votes",
      "weighted-majority": "the first sample of the answer with the largest summed reward",
      "adaptive-majority": "the vote's leader when sampling stopped",
      "best-of-n": "the sample the reward model scored highest",
    }[g.strategy] || "the sample the strategy returned";
    const rows = g.trace.map((s, i) => el("tr", { class: i === g.chosen ? "chosen sample" : "sample", "data-i": i },
      el("td", { class: "num", text: i + 1 }), el("td", { text: s.answer === null || s.answer === undefined ? "" : s.answer }),
      el("td", { class: "num", text: s.answer !== null && votes[s.answer] !== undefined ? fmt(votes[s.answer], 2) : "" }),
      el("td", { class: "num", text: s.score === null ? "" : fmt(s.score, 3) }),
      el("td", { class: "num", text: (s.usage || {}).generated_tokens }),
      el("td", { text: Object.entries(s.meta || {}).filter(([k]) => k !== "strategy")
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ") }),
      el("td", {}, el("code", { text: s.text.trim().replace(/\n/g, " \u21b5 ") }))));
    return el("div", {}, el("h3", { text: `${g.trace.length} samples` }),
      el("p", { id: "why", text: g.chosen === null ? "The answer is not one of the samples." :
        `Chosen: sample ${g.chosen + 1}, ${why}.` }),
      el("table", { id: "samples" }, el("tr", {}, ...["#", "answer", "votes", "score", "tokens", "meta", "text"]
        .map((h) => el("th", { text: h }))), ...rows));
  }

  // -- the tree ---------------------------------------------------------------------------
  function treeView(g) {
    const root = g.trace;
    const chosen = new Set(g.chosen_path || []);
    const collapsed = new Set();
    const byId = new Map();
    (function index(n, parent) { n._parent = parent; byId.set(n.id, n); for (const c of n.children) index(c, n); })(root, null);
    const wrap = el("div", { class: "tree-wrap" });
    const svg = sv("svg", { class: "tree-svg", id: "tree", "data-nodes": byId.size });
    const layer = sv("g", {});
    svg.append(layer);
    wrap.append(svg);
    const detail = el("div", { class: "detail", id: "detail" }, el("p", { class: "muted",
      text: "Click a node for its step, score and bill. Wheel: zoom; drag: pan; shift-click: fold a subtree." }));
    let view = { x: -20, y: -20, k: 1 };
    const apply = () => layer.setAttribute("transform", `translate(${-view.x * view.k} ${-view.y * view.k}) scale(${view.k})`);
    const DX = 170, DY = 22;

    function draw() {
      layer.replaceChildren();
      let leaf = 0;
      const pos = new Map();
      (function place(n) {
        const kids = collapsed.has(n.id) ? [] : n.children;
        if (!kids.length) { pos.set(n.id, { x: n.depth * DX, y: leaf++ * DY }); return; }
        for (const c of kids) place(c);
        const ys = kids.map((c) => pos.get(c.id).y);
        pos.set(n.id, { x: n.depth * DX, y: (Math.min(...ys) + Math.max(...ys)) / 2 });
      })(root);
      const edges = sv("g", {}), nodes = sv("g", {});
      for (const [id, p] of pos) {
        const n = byId.get(id);
        if (n._parent && pos.has(n._parent.id)) {
          const q = pos.get(n._parent.id);
          edges.append(sv("path", { d: `M${q.x},${q.y} C${(q.x + p.x) / 2},${q.y} ${(q.x + p.x) / 2},${p.y} ${p.x},${p.y}`,
                                    class: "edge" + (chosen.has(id) && chosen.has(n._parent.id) ? " chosen" : "") }));
        }
        // a path that stopped before its end: pruned by the search (or rejected); an MCTS leaf
        // valued by rollouts, or the chosen path's end, is not
        const pruned = !n.terminal && !n.children.length && n._parent !== null && !(n.rollouts || []).length &&
          !chosen.has(id);
        const cls = ["node", n.terminal ? "terminal" : "", pruned ? "pruned" : "", chosen.has(id) ? "chosen" : "",
                     n.finish === "rejected" ? "rejected" : "", collapsed.has(id) ? "collapsed" : ""].join(" ");
        const grp = sv("g", { class: cls.replace(/\s+/g, " ").trim(), transform: `translate(${p.x} ${p.y})`, "data-id": id });
        const shape = n.terminal ? sv("rect", { x: -7, y: -7, width: 14, height: 14, class: "shape" })
                                 : sv("circle", { r: n._parent === null ? 5 : 7, class: "shape" });
        shape.setAttribute("fill", n._parent === null ? "#555" : scoreColour(n.score));
        shape.setAttribute("stroke", collapsed.has(id) ? "#000" : "#555");
        grp.append(shape);
        const label = sv("text", { x: 11, y: 4 });
        const step = (n.step || "").replace(/\n/g, " ").trim();
        label.textContent = (n._parent === null ? "question" : (step.length > 22 ? step.slice(0, 21) + "\u2026" : step)) +
          (n.visits ? ` n=${n.visits}` : "") + (collapsed.has(id) ? ` [+${count(n) - 1}]` : "");
        grp.append(label);
        grp.addEventListener("click", (ev) => {
          ev.stopPropagation();
          if (ev.shiftKey && n.children.length) { collapsed.has(id) ? collapsed.delete(id) : collapsed.add(id); draw(); }
          else show(n);
        });
        grp.addEventListener("mousemove", (ev) => showTip(ev, [step || "(root)", `score ${fmt(n.score, 3)}` +
          (n.visits ? `, ${n.visits} visits` : ""), `${n.finish || "open"}${n.terminal ? ", terminal" : ""}`]));
        grp.addEventListener("mouseleave", hideTip);
        nodes.append(grp);
      }
      layer.append(edges, nodes);
      apply();
    }
    function count(n) { let k = 1; for (const c of n.children) k += count(c); return k; }
    function show(n) {
      const u = n.usage || {};
      const kids = [el("h3", { text: n._parent === null ? "the question" : `step at depth ${n.depth}` }),
        el("pre", { text: n.step || "" }),
        el("div", { text: `score ${fmt(n.score, 4)}; ${n.finish || "open"}${n.terminal ? " (terminal)" : ""}` +
          `${chosen.has(n.id) ? "; on the chosen path" : ""}` }),
        el("div", { text: `visits ${n.visits || 0}, value ${fmt(n.value, 3)}` }),
        el("div", { text: `bill: ${u.generated_tokens || 0} generated, ${u.computed_tokens || 0} computed tokens, ` +
          `${sci(u.flops || 0)} FLOPs` })];
      if ((n.drafts || []).length) kids.push(el("h4", { text: `${n.drafts.length} drafts replaced` }),
        ...n.drafts.map((d) => el("pre", { text: `${fmt(d.score, 3)}${d.by ? " (" + d.by + ")" : ""}: ${d.step}` })));
      if ((n.rollouts || []).length) kids.push(el("h4", { text: `${n.rollouts.length} rollouts` }),
        ...n.rollouts.map((r) => el("pre", { text: `${fmt(r.score, 3)}: ${r.text}` })));
      if (n.children.length) kids.push(el("button", { text: collapsed.has(n.id) ? "unfold" : "fold", onclick: () => {
        collapsed.has(n.id) ? collapsed.delete(n.id) : collapsed.add(n.id); draw(); show(n); } }));
      detail.replaceChildren(...kids);
    }
    function follow() {  // fold everything off the chosen path, then bring its end into view
      collapsed.clear();
      for (const [id, n] of byId) if (!chosen.has(id) && n.children.length) collapsed.add(id);
      draw();
      const last = [...chosen].pop();
      const node = layer.querySelector(`[data-id="${last}"]`);
      if (node) {
        const m = /translate\(([-\d.]+) ([-\d.]+)\)/.exec(node.getAttribute("transform"));
        const r = svg.getBoundingClientRect();
        view = { k: 1, x: +m[1] - r.width / 2, y: +m[2] - r.height / 2 };
        apply();
        show(byId.get(last));
      }
    }
    // zoom about the pointer, pan by dragging
    svg.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const r = svg.getBoundingClientRect();
      const k = Math.max(0.1, Math.min(4, view.k * (ev.deltaY < 0 ? 1.15 : 1 / 1.15)));
      const px = view.x + (ev.clientX - r.left) / view.k, py = view.y + (ev.clientY - r.top) / view.k;
      view = { k, x: px - (ev.clientX - r.left) / k, y: py - (ev.clientY - r.top) / k };
      apply();
    }, { passive: false });
    let drag = null;
    svg.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, v: { ...view } }; });
    svg.addEventListener("mouseup", () => { drag = null; });
    svg.addEventListener("mouseleave", () => { drag = null; });
    svg.addEventListener("mousemove", (ev) => {
      if (!drag) return;
      view = { ...drag.v, x: drag.v.x - (ev.clientX - drag.x) / view.k, y: drag.v.y - (ev.clientY - drag.y) / view.k };
      apply();
    });
    const fit = () => {
      const r = svg.getBoundingClientRect(), b = layer.getBBox();
      const k = Math.min(1.2, Math.max(0.1, Math.min(r.width / (b.width + 60), r.height / (b.height + 40))));
      view = { k, x: b.x - 20 / k, y: b.y - 20 / k };
      apply();
    };
    wrap.addEventListener("ponder:drawn", fit);
    draw();
    const controls = el("div", { class: "controls" },
      el("button", { id: "follow", text: "follow the chosen path", onclick: follow }),
      el("button", { id: "unfold", text: "unfold all", onclick: () => { collapsed.clear(); draw(); } }),
      el("button", { id: "fit", text: "fit", onclick: fit }),
      el("button", { text: "+", onclick: () => { view.k = Math.min(4, view.k * 1.25); apply(); } }),
      el("button", { text: "\u2212", onclick: () => { view.k = Math.max(0.1, view.k / 1.25); apply(); } }),
      el("span", { class: "muted", text: `${byId.size} nodes (root included); colour: score, red 0 to green 1; ` +
        "squares end a path; faded dashed: pruned or rejected; gold: the chosen path" }));
    return [el("h3", { text: "search tree" }), controls, el("div", { class: "layout" }, wrap, detail)];
  }

  // -- routing ----------------------------------------------------------------------------
  function route() {
    hideTip();
    const parts = (location.hash.replace(/^#\/?/, "") || "").split("/").filter((x) => x !== "").map(decodeURIComponent);
    const t0 = performance.now();
    let done;
    try {
      if (!parts.length) done = overview();
      else if (parts[0] === "problems" && parts.length >= 2) done = problems(parts[1], parts[2]);
      else if (parts[0] === "p" && parts.length === 3) done = oneProblem(parts[1], parts[2]);
      else if (parts[0] === "g" && parts.length === 2) done = generation(parts[1]);
      else done = problemPage(`There is no view ${JSON.stringify(location.hash)}; the views are the overview, ` +
        "a task's problems, one problem and one generation.");
    } catch (e) {
      done = problemPage(`This view failed on this store's data (${e.message}); the store may be from another ` +
        "ponder. The overview and other views may still work.");
    }
    // what the tests and benchmarks wait for: the view is drawn (after layout: the next frame)
    Promise.resolve(done).then(() => requestAnimationFrame(() => {
      window.ponderRendered = { view: parts[0] || "overview", ms: performance.now() - t0, at: performance.now() };
    }));
  }
  window.addEventListener("hashchange", route);
  route();
})();
