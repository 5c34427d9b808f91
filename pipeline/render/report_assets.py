"""Inline CSS and JavaScript of the HTML report (static text; no data goes in here)."""

CSS = """
:root { --ink: #1d1d1f; --muted: #62636a; --line: #dcdce0; --same: #1f77b4; --diff: #d62728; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1400px; padding: 20px 28px 60px; color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; background: #fafafa; }
h1 { margin: 0 0 2px; font-size: 26px; }
h2 { margin: 30px 0 10px; font-size: 20px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 0 0 2px; font-size: 17px; }
.sub, .hint, .note, .empty { color: var(--muted); margin: 2px 0 10px; overflow-wrap: anywhere; }
section.warning { background: #fff4e5; border-left: 4px solid #e67e22; padding: 4px 14px; margin: 10px 0; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.tile { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 130px; }
.tile .v { font-size: 24px; font-weight: 650; }
.tile .k { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; background: #fff; margin: 8px 0; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; max-width: 640px; font-size: 14px; }
table.kv th { font-weight: 500; color: var(--muted); white-space: nowrap; }
table.gates tr.fail td { color: #b00020; font-weight: 600; }
code { font-size: 13px; }
svg.histogram { width: 100%; max-width: 900px; height: auto; background: #fff;
  border: 1px solid var(--line); border-radius: 8px; }
.look { border-left: 5px solid #e0a100; background: #fff8e6; padding: 12px 14px; margin: 12px 0; border-radius: 6px; }
#off-object { border-left-color: #8e44ad; background: #f6effa; }
.controls { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; margin: 8px 0 12px; }
.controls select, .controls input { font: inherit; padding: 3px 6px; }
.count { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
  display: flex; flex-direction: column; }
.card[hidden] { display: none; }
.card.error { border-color: var(--diff); }
.card img { display: block; width: 100%; height: auto; background: #eee; min-height: 120px; }
.noimg { height: 120px; display: flex; align-items: center; justify-content: center; color: var(--muted);
  background: #f0f0f0; }
.meta { padding: 8px 10px; }
.pid { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.sim b { font-size: 20px; }
.badge { display: inline-block; font-size: 12px; padding: 1px 7px; border-radius: 10px;
  background: #eee; color: #333; vertical-align: 3px; }
.badge.lab-1 { background: #dbeaf7; color: var(--same); }
.badge.lab-0 { background: #fbe0e0; color: var(--diff); }
.badge.err { background: var(--diff); color: #fff; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 10px; margin: 6px 0 0; font-size: 13px; }
dt { color: var(--muted); }
dd { margin: 0; }
p.error { color: var(--diff); font-size: 13px; margin: 6px 0 0; overflow-wrap: anywhere; }
"""

SCRIPT = """
(() => {
  "use strict";
  const grid = document.getElementById("gallery-cards");
  const cards = Array.from(grid.children);
  const controls = { sort: "sort", label: "f-label", status: "f-status", q: "f-text" };
  const el = (key) => document.getElementById(controls[key]);
  const DEFAULT_SORT = "table:asc";
  const number = (card, key) => (card.dataset[key] === "" ? NaN : parseFloat(card.dataset[key]));
  const compare = (key, sign) => (a, b) => {
    if (key === "pairId") return sign * a.dataset.pairId.localeCompare(b.dataset.pairId);
    const x = number(a, key), y = number(b, key);
    if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) - Number.isNaN(y);
    return sign * (x - y);
  };
  const apply = () => {
    const [key, dir] = (el("sort").value || DEFAULT_SORT).split(":");
    const order = key === "table" ? cards.slice() : cards.slice().sort(compare(key, dir === "desc" ? -1 : 1));
    const label = el("label").value, status = el("status").value, q = el("q").value.trim().toLowerCase();
    let shown = 0;
    for (const card of order) {
      const match = (!label || card.dataset.label === label) && (!status || card.dataset.status === status)
        && (!q || card.dataset.pairId.toLowerCase().includes(q));
      card.hidden = !match;
      shown += match;
      grid.appendChild(card);
    }
    document.getElementById("shown").textContent = shown.toLocaleString();
    const state = new URLSearchParams();
    for (const k of Object.keys(controls)) {
      const v = el(k).value;
      if (v && !(k === "sort" && v === DEFAULT_SORT)) state.set(k, v);
    }
    const hash = state.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  };
  const initial = new URLSearchParams(location.hash.slice(1));
  for (const k of Object.keys(controls)) {
    if (initial.has(k)) el(k).value = initial.get(k);
    el(k).addEventListener("input", apply);
  }
  apply();
})();
"""
