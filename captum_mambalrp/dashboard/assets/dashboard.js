"use strict";
// The MambaLRP dashboard. Every piece of text reaches the page through textContent or
// an attribute value, never as HTML, so an input holding markup shows as text.
(function () {
  const data = JSON.parse(document.getElementById("dashboard-data").textContent);
  const info = data.info;
  const state = { results: data.results || [], current: -1, busy: false, done: 0, words: false };
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmt(x, digits) {
    if (typeof x !== "number" || !isFinite(x)) return String(x);
    if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e4)) return x.toExponential(digits - 1);
    return x.toFixed(digits);
  }

  // The package's one colour convention (captum_mambalrp/visualization/colors.py, rgb):
  // red for positive relevance (for the explained class), blue for negative (against), white for none.
  function colour(v) {
    const a = Math.max(-1, Math.min(1, v));
    const fade = Math.floor(255 * (1 - Math.abs(a)));  // as Python's int(): the same colour to the unit
    return a >= 0 ? `rgb(255, ${fade}, ${fade})` : `rgb(${fade}, ${fade}, 255)`;
  }

  function paint(node, v) {
    node.style.backgroundColor = colour(v);
    if (Math.abs(v) > 0.6) node.style.color = "#fff";
  }

  function peak(values) {
    return values.reduce((m, v) => Math.max(m, Math.abs(v)), 0) || 1;
  }

  function tokenSpan(token, value, scale) {
    const span = el("span", { class: "tok", "data-relevance": value, title: `${token}: ${fmt(value, 4)}` }, token);
    paint(span, value / scale);
    return span;
  }

  // the shown units: tokens, or words (the relevance of a word is the sum of its pieces')
  function units(r, values) {
    if (!state.words || !Array.isArray(r.words)) return [r.tokens, values];
    return [r.words.map((w) => w[0]), r.words.map((w) => w[1].reduce((s, i) => s + values[i], 0))];
  }

  function mergeable(r) {
    return Array.isArray(r.words) && r.words.some((w) => w[1].length > 1);
  }

  function legend() {
    const box = $("legend");
    box.replaceChildren(el("b", {}, "Legend: "));
    for (const [v, label] of [[1, "for the explained class (positive)"], [0, "none"], [-1, "against it (negative)"]]) {
      const sw = el("span", { class: "swatch", "data-value": v });
      sw.style.backgroundColor = colour(v);
      const item = el("span", { class: "legend-item" });
      item.appendChild(sw);
      item.appendChild(document.createTextNode(` ${label}`));
      box.appendChild(item);
    }
  }

  function heatmap(tokens, values) {
    const box = el("div", { class: "tokens" });
    const scale = peak(values);
    tokens.forEach((t, i) => { box.appendChild(tokenSpan(t, values[i], scale)); box.appendChild(document.createTextNode(" ")); });
    return box;
  }

  function showSummary(r) {
    const box = $("summary");
    box.replaceChildren();
    const dl = el("dl");
    const mrp = r.methods[0];
    const prob = typeof r.prediction.prob === "number" ? ` (p = ${fmt(r.prediction.prob, 3)})` : "";
    const rows = [
      ["text", r.text],
      ["prediction", `${r.prediction.label}${prob}`],
      ["top classes", (r.top || []).map((t) => `${t.label} ${fmt(t.prob, 3)}`).join(", ") || "(not saved)"],
      ["explained", `logit of ${r.target.label} at position ${r.target.position} = ${fmt(r.target.logit, 4)}`],
      ["MambaLRP sum", fmt(mrp.sum, 4)],
      ["convergence delta", fmt(r.delta, 3)],
    ];
    const ids = ["s-text", "s-prediction", "s-top", "s-explained", "s-sum", "s-delta"];
    if (r.saved) {
      const s = r.saved;
      rows.push(["saved result", `${s.file} · model ${s.model} (config ${s.config_hash || "?"}) · rules ${s.composite || "?"} · ${s.created}`]);
      rows.push(["versions", s.versions]);
      ids.push("s-saved", "s-versions");
    }
    rows.forEach(([k, v], i) => { dl.appendChild(el("dt", {}, k)); dl.appendChild(el("dd", { id: ids[i] }, v)); });
    box.appendChild(dl);
  }

  function showMethods(r) {
    const box = $("methods");
    box.replaceChildren();
    for (const m of r.methods) {
      const card = el("div", { class: "method", "data-method": m.key });
      card.appendChild(el("h3", { title: m.description }, m.name));
      const time = typeof m.seconds === "number" ? ` · ${fmt(m.seconds * 1000, 0)} ms` : "";
      card.appendChild(el("div", { class: "stats" }, `sum ${fmt(m.sum, 4)} · Δ ${fmt(m.delta, 3)}${time}`));
      const [shown, values] = units(r, m.relevance);
      card.appendChild(heatmap(shown, values));
      box.appendChild(card);
    }
  }

  function showLayers(r) {
    const box = $("layers");
    box.replaceChildren();
    const L = r.layers;
    $("layers-part").hidden = !L;
    if (!L) return;
    const rows = L.relevance.map((values) => units(r, values)[1]);
    const scale = peak(rows.flat());
    const table = el("table", { id: "layer-table" });
    const head = el("tr");
    head.appendChild(el("th", { class: "name" }, "layer"));
    units(r, r.tokens.map(() => 0))[0].forEach((t) => head.appendChild(el("th", {}, t)));
    head.appendChild(el("th", {}, "sum"));
    head.appendChild(el("th", {}, "Δ"));
    table.appendChild(head);
    L.names.forEach((name, i) => {
      const tr = el("tr", { "data-layer": name });
      tr.appendChild(el("td", { class: "name" }, name));
      rows[i].forEach((v) => {
        const td = el("td", { "data-relevance": v, title: fmt(v, 4) }, fmt(v, 3));
        paint(td, v / scale);
        tr.appendChild(td);
      });
      tr.appendChild(el("td", {}, fmt(L.totals[i], 4)));
      tr.appendChild(el("td", {}, fmt(L.deltas[i], 2)));
      table.appendChild(tr);
    });
    box.appendChild(table);
  }

  function show(index) {
    state.current = index;
    const r = state.results[index];
    $("result").hidden = false;
    $("words").disabled = !mergeable(r);
    showSummary(r);
    showMethods(r);
    showLayers(r);
    const pick = $("pick");
    pick.replaceChildren();
    state.results.forEach((x, i) => pick.appendChild(el("option", { value: i }, `${i + 1}. ${x.text.slice(0, 80)}`)));
    pick.value = String(index);
    document.body.setAttribute("data-results", String(state.results.length));
    $("history").hidden = state.results.length < 2;
    if (data.mode === "server") $("export").disabled = $("save").disabled = state.results.length === 0;
  }

  function message(text) {
    const box = $("message");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function studyTable(t) {
    const wrap = el("div", { class: "study-table scroll" });
    wrap.appendChild(el("div", { class: "note" }, t.name));
    const table = el("table");
    t.rows.forEach((row, i) => {
      const tr = el("tr");
      row.forEach((c, j) => tr.appendChild(el(i === 0 ? "th" : "td", j === 0 ? { class: "name" } : {}, c)));
      table.appendChild(tr);
    });
    wrap.appendChild(table);
    return wrap;
  }

  function showStudy(study) {
    if (!study) return;
    $("study").hidden = false;
    $("study-folder").textContent = `from ${study.folder}`;
    study.tables.forEach((t) => $("study-tables").appendChild(studyTable(t)));
    for (const im of study.images) {
      if (typeof im.src !== "string" || !im.src.startsWith("data:image/png;base64,")) continue;
      const fig = el("figure");
      const img = el("img", { alt: im.name });
      img.src = im.src;
      fig.appendChild(img);
      fig.appendChild(el("figcaption", {}, im.name));
      $("study-images").appendChild(fig);
    }
  }

  function post(path, body) {
    return fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  }

  function chosenMethods() {
    return Array.from(document.querySelectorAll("#method-choice input:checked")).map((x) => x.value);
  }

  async function explain() {
    if (state.busy) return;
    message("");
    state.busy = true;
    $("explain").disabled = true;
    $("status").textContent = "explaining…";
    try {
      const res = await post("api/explain", { text: $("text").value, target: $("target").value, methods: chosenMethods() });
      const body = await res.json();
      if (!res.ok) { message(body.error || `error ${res.status}`); return; }
      state.results.push(body);
      show(state.results.length - 1);
    } catch (err) {
      message(`The server did not answer: ${err}`);
    } finally {
      state.busy = false;
      state.done += 1;  // requests answered (tests wait on it)
      document.body.setAttribute("data-done", String(state.done));
      $("explain").disabled = false;
      $("status").textContent = "";
    }
  }

  async function download(path, name) {
    const res = await post(path, { results: state.results });
    if (!res.ok) { message((await res.json()).error || `error ${res.status}`); return; }
    const blob = await res.blob();
    const a = el("a", { download: name });
    a.href = URL.createObjectURL(blob);
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  function setupControls() {
    $("controls").hidden = false;
    for (const ex of data.examples) $("examples").appendChild(el("option", { value: ex }, ex));
    $("examples").addEventListener("change", (e) => { if (e.target.value) $("text").value = e.target.value; });
    for (const label of info.labels) $("target").appendChild(el("option", { value: label }, label));
    for (const m of info.methods) {
      const lab = el("label", { title: m.description });
      const box = el("input", { type: "checkbox", value: m.key, id: `method-${m.key}` });
      box.checked = info.default_methods.includes(m.key);
      lab.appendChild(box);
      lab.appendChild(document.createTextNode(` ${m.name}`));
      $("method-choice").appendChild(lab);
    }
    $("explain").addEventListener("click", explain);
    $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) explain(); });
    $("export").addEventListener("click", () => download("api/export", "mambalrp_dashboard.html"));
    $("save").addEventListener("click", () => download("api/save", "mambalrp_results.json"));
  }

  $("model-line").textContent =
    `model: ${info.source} · rules: ${info.composite} · ${info.layers.length - 1} blocks` +
    (data.mode === "static" ? " · exported view (offline)" : "");
  $("pick").addEventListener("change", (e) => show(Number(e.target.value)));
  $("words").addEventListener("change", (e) => { state.words = e.target.checked; if (state.current >= 0) show(state.current); });
  legend();
  if (data.mode === "server") setupControls();
  showStudy(data.study);
  if (state.results.length) show(0);
  document.body.setAttribute("data-done", "0");
  document.body.setAttribute("data-ready", "1");
})();
