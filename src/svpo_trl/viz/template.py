"""The tree page: HTML skeleton, CSS and vanilla JS (no library, no network).

The JS lays the visible part of a tree out with a leaf-ordering tidy layout (leaves on a grid,
parents centred over their first and last child), recomputed on every collapse/expand. When a tree is
fitted to the window, the distance between depths stretches so that the tree's shape matches the
canvas (a wide tree fills the window's height, not only its top), and labels and toggles grow as far as
the leaf spacing allows when the tree is shown shrunk. The legend sits in a strip under the tree.
Model text only ever reaches the DOM through ``textContent``.
"""

PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>{{CSS}}</style>
</head>
<body>
<header>
  <div id="question-line"><span class="tag">Question</span> <span id="question"></span></div>
  <div id="controls">
    <span class="tag">Gold</span> <span id="gold"></span>
    <label>Tree <select id="tree-select"></select></label>
    <button id="fit" title="Fit the tree to the window">Fit</button>
    <button id="zoom-in" title="Zoom in">+</button><button id="zoom-out" title="Zoom out">&minus;</button>
    <button id="expand-all">Expand all</button>
    <label>Collapse below depth <input id="depth" type="number" min="0" max="99" value="2"></label>
    <button id="collapse-depth">Apply</button>
    <span id="stats"></span>
  </div>
</header>
<main>
  <div id="canvas">
    <svg id="svg" xmlns="http://www.w3.org/2000/svg">
      <defs>
        <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7"
                orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="context-stroke"></path></marker>
      </defs>
      <g id="viewport"><g id="edges"></g><g id="pair-links"></g><g id="nodes"></g></g>
    </svg>
    <div id="legend">
      <div class="row"><span>Q</span><span class="scale-end">&minus;1</span><span class="scale"></span>
        <span class="scale-end">+1</span></div>
      <div class="row" id="legend-size"></div>
      <div class="row"><span class="ok">&#10003;</span> correct terminal <span class="bad">&#10007;</span> incorrect
        <span class="other">&#8856;</span> no answer</div>
      <div class="row"><span class="path-sample"></span> path to a correct answer</div>
      <div class="row" id="legend-pairs"></div>
      <div class="row hint">drag to pan · wheel to zoom · click a node · &oplus;/&ominus; to expand/collapse</div>
    </div>
    <div id="tooltip" hidden></div>
  </div>
  <aside id="detail"><p class="hint">Click a node to see its step: analysis, code, output, Q, N, prior.</p></aside>
</main>
<script type="application/json" id="tree-data">{{DATA}}</script>
<script>{{JS}}</script>
</body>
</html>
"""

PAGE_CSS = """
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; }
body { display: flex; flex-direction: column; }
header { padding: 8px 12px; border-bottom: 1px solid #ddd; background: #fff; }
#question-line { white-space: pre-wrap; max-height: 4.5em; overflow: auto; margin-bottom: 6px; }
#controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
#controls input { width: 3.5em; }
button, select, input { font: inherit; }
button { padding: 1px 8px; border: 1px solid #bbb; background: #f6f6f6; border-radius: 4px; cursor: pointer; }
button:hover { background: #eaeaea; }
.tag { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: #fff; background: #555;
       border-radius: 3px; padding: 1px 5px; }
#gold { font-weight: 600; margin-right: 10px; }
#stats { color: #555; margin-left: auto; }
main { flex: 1; display: flex; min-height: 0; }
#canvas { flex: 1; position: relative; min-width: 0; display: flex; flex-direction: column; }
#svg { flex: 1; min-height: 0; width: 100%; display: block; background: #fbfbfb; cursor: grab; user-select: none; }
#svg.dragging { cursor: grabbing; }
.edge { fill: none; stroke: #b9b9b9; stroke-width: 1.3; }
.edge.correct { stroke: #1a9850; stroke-width: 3.2; stroke-opacity: .75; }
.edge.trail { stroke: #222; stroke-width: 2.2; stroke-opacity: 1; }
.node { cursor: pointer; }
.node circle.body { stroke: #666; stroke-width: 1; }
.node.terminal circle.body { stroke-width: 2.4; }
.node.correct circle.body { stroke: #1a9850; }
.node.incorrect circle.body { stroke: #d73027; }
.node.selected circle.body { stroke: #000; stroke-width: 3.4; }
.node.onpath circle.body { stroke-width: 2; }
.label { text-anchor: middle; fill: #333; pointer-events: none; }
.label .ok, .ok { fill: #1a9850; color: #1a9850; font-weight: 700; }
.label .bad, .bad { fill: #d73027; color: #d73027; font-weight: 700; }
.label .other, .other { fill: #777; color: #777; }
.toggle circle { fill: #fff; stroke: #777; stroke-width: 1; }
.toggle text { text-anchor: middle; dominant-baseline: central; fill: #333; }
.toggle .count { text-anchor: start; fill: #777; }
.toggle:hover circle { fill: #ffe9a8; }
.pair { fill: none; stroke-width: 1.6; stroke-dasharray: 5 4; stroke-opacity: .55; }
.pair.focus { stroke-width: 2.8; stroke-opacity: 1; }
.pair.faded { stroke-opacity: .12; }
#svg.lod-low .label, #svg.lod-low .toggle .count { display: none; }
#legend { display: flex; flex-wrap: wrap; align-items: center; gap: 2px 18px; border-top: 1px solid #ddd;
          background: #fff; padding: 5px 12px; font-size: 12px; }
#legend .row { display: flex; align-items: center; gap: 6px; margin: 1px 0; flex-wrap: wrap; }
#legend .scale { display: inline-block; width: 150px; height: 10px; border: 1px solid #ccc;
                 background: linear-gradient(to right, rgb(215,48,39), rgb(235,235,235), rgb(26,152,80)); }
#legend .path-sample { display: inline-block; width: 26px; height: 0; border-top: 3px solid #1a9850; }
#legend label { display: inline-flex; align-items: center; gap: 3px; margin-right: 6px; cursor: pointer; }
#legend .swatch { display: inline-block; width: 22px; height: 0; border-top: 2px dashed; }
.hint { color: #777; }
#tooltip { position: absolute; pointer-events: none; background: #222; color: #fff; font-size: 12px; padding: 4px 7px;
           border-radius: 4px; max-width: 360px; white-space: pre-wrap; }
aside { width: 360px; border-left: 1px solid #ddd; overflow: auto; padding: 8px 12px; background: #fff; }
aside h2 { font-size: 16px; margin: 4px 0 8px; }
aside h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .05em; color: #666; margin: 12px 0 4px; }
aside dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 0; }
aside dt { color: #666; }
aside dd { margin: 0; font-variant-numeric: tabular-nums; }
aside pre, aside .analysis { white-space: pre-wrap; word-break: break-word; background: #f5f5f5; border-radius: 4px;
           padding: 6px 8px; margin: 0; font-size: 12.5px; }
aside pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
aside .error { color: #b00; }
aside ul { padding-left: 18px; margin: 4px 0; }
aside a { color: #1f5fa8; cursor: pointer; text-decoration: underline; }
"""

PAGE_JS = r"""
(function () {
  'use strict';
  const DATA = JSON.parse(document.getElementById('tree-data').textContent);
  const CFG = DATA.config;
  const SVGNS = 'http://www.w3.org/2000/svg';
  const PAIR_COLORS = { sibling: '#1f78b4', cousin: '#8e44ad', terminal: '#ff7f00' };
  const svg = document.getElementById('svg');
  const viewport = document.getElementById('viewport');
  const layers = { edges: document.getElementById('edges'), pairs: document.getElementById('pair-links'),
                   nodes: document.getElementById('nodes') };
  const shownPairTypes = new Set(Object.keys(PAIR_COLORS));
  const states = [];
  let S = null;
  let S_nodes = null;  // byId of the tree being prepared
  const view = { k: 1, x: 0, y: 0 };

  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const key in attrs) e.setAttribute(key, attrs[key]);
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function htmlEl(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined) return '—';
    if (typeof v === 'number') return Number.isInteger(v) && digits === undefined ? String(v) : v.toFixed(digits === undefined ? 3 : digits);
    return String(v);
  }
  // Q in at most 4 characters (".67", "−.5", "1"), so that a label fits the leaf spacing at a legible size.
  function shortNumber(v) {
    if (v === null || v === undefined) return '—';
    const text = String(Number(Math.abs(v).toFixed(2))).replace(/^0(?=\.)/, '');
    return (v < 0 && text !== '0' ? '−' : '') + text;
  }
  // Q in [-1, 1] -> red / light grey / green, as in the paper's Figure 1.
  function qColor(q) {
    if (q === null || q === undefined || Number.isNaN(q)) return 'rgb(204,204,204)';
    const t = Math.max(-1, Math.min(1, q));
    const mid = [235, 235, 235], end = t < 0 ? [215, 48, 39] : [26, 152, 80], a = Math.abs(t);
    const c = mid.map((m, i) => Math.round(m + (end[i] - m) * a));
    return 'rgb(' + c.join(',') + ')';
  }
  function marker(n) {
    if (!n.terminal) return null;
    if (n.correct === true) return ['ok', '\u2713'];
    if (n.correct === false) return ['bad', '\u2717'];
    return ['other', '\u2298'];
  }

  function prepare(index) {
    if (states[index]) return states[index];
    const tree = DATA.trees[index];
    const byId = new Map();
    tree.nodes.forEach(n => { n.children = []; byId.set(n.id, n); });
    tree.nodes.forEach(n => { if (n.parent >= 0) byId.get(n.parent).children.push(n); });
    let maxN = 1;
    tree.nodes.forEach(n => { if (n.n > maxN) maxN = n.n; });
    (function count(n) { n.size = 1; n.children.forEach(c => { count(c); n.size += c.size; }); })(byId.get(0));
    S_nodes = byId;
    const pairsOf = new Map();
    tree.pairs.forEach((p, i) => {
      p.index = i;
      [p.chosen, p.rejected].forEach(id => {
        if (id === null) return;
        if (!pairsOf.has(id)) pairsOf.set(id, []);
        pairsOf.get(id).push(p);
      });
    });
    const state = { index, tree, byId, root: byId.get(0), maxN, pairsOf, collapsed: defaultCollapsed(tree.nodes, byId.get(0)),
                    selected: null };
    states[index] = state;
    return state;
  }

  // Large trees open legibly: the path to the most visited correct terminal, then the most visited
  // nodes (where the search spent its simulations) while at most max_visible_leaves leaves show.
  function defaultCollapsed(nodes, root) {
    const inner = nodes.filter(n => n.children.length);
    if (nodes.length - inner.length <= CFG.max_visible_leaves) return new Set();
    const collapsed = new Set(inner.map(n => n.id));
    let leaves = 1;
    const open = n => { collapsed.delete(n.id); leaves += n.children.length - 1; };
    for (let n = root; n && n.children.length && leaves + n.children.length - 1 <= CFG.max_visible_leaves;) {
      open(n);
      n = n.children.filter(c => c.on_path).sort((a, b) => b.n - a.n)[0];
    }
    const frontier = () => nodes.filter(n => collapsed.has(n.id) && isShown(n, collapsed));
    let candidates = frontier().sort((a, b) => b.n - a.n || a.id - b.id);
    while (candidates.length) {
      const n = candidates.find(c => leaves + c.children.length - 1 <= CFG.max_visible_leaves);
      if (!n) break;
      open(n);
      candidates = frontier().sort((a, b) => b.n - a.n || a.id - b.id);
    }
    return collapsed;
  }
  function isShown(n, collapsed) {
    for (let m = n.parent >= 0 ? n.parent : -1; m >= 0; m = S_nodes.get(m).parent) if (collapsed.has(m)) return false;
    return true;
  }
  function collapseFrom(nodes, depth, keepPaths) {
    return new Set(nodes.filter(n => n.children.length && n.depth >= depth && !(keepPaths && n.on_path)).map(n => n.id));
  }

  function radius(n) {
    return CFG.min_radius + (CFG.max_radius - CFG.min_radius) * Math.sqrt(Math.max(0, n.n) / S.maxN);
  }

  const FIT_PAD = 24;
  const LABEL_PX = 11;  // label font size at glyph scale 1, in SVG units
  // Largest glyph scale at which a 4-character label (about 2.4 em) still fits between two leaves.
  const MAX_GLYPH = 0.9 * CFG.node_spacing / (2.4 * LABEL_PX);

  // Depth spacing and glyph scale for the window: depths spread until the tree's shape matches the canvas
  // (up to 3x the configured spacing), and when the fitted tree is shrunk, labels and toggles grow to stay
  // legible, as far as the leaf spacing allows.
  function adaptToWindow() {
    const W = Math.max(200, svg.clientWidth || 800) - 2 * FIT_PAD, H = Math.max(200, svg.clientHeight || 600) - 2 * FIT_PAD;
    S.levelSpacing = CFG.level_spacing;
    const visible = layout();
    const leaves = visible.filter(n => S.collapsed.has(n.id) || !n.children.length).length;
    const depth = Math.max(0, ...visible.map(n => n.depth));
    const width = Math.max(1, leaves - 1) * CFG.node_spacing + 1.2 * CFG.node_spacing;
    const extra = 2 * CFG.max_radius + 4 * LABEL_PX;
    if (depth > 0) {
      const wanted = (H * width / W - extra) / depth;
      S.levelSpacing = Math.min(3 * CFG.level_spacing, Math.max(CFG.level_spacing, wanted));
    }
    const k = Math.min(W / width, H / (depth * S.levelSpacing + extra), 1.6);
    S.glyph = Math.max(1, Math.min(1 / k, MAX_GLYPH));
  }

  // Leaf-ordering tidy layout of the visible nodes.
  function layout() {
    let leaf = 0;
    const visible = [];
    (function visit(n) {
      visible.push(n);
      n.y = n.depth * (S.levelSpacing || CFG.level_spacing);
      const kids = S.collapsed.has(n.id) ? [] : n.children;
      if (!kids.length) { n.x = leaf * CFG.node_spacing; leaf += 1; return; }
      kids.forEach(visit);
      n.x = (kids[0].x + kids[kids.length - 1].x) / 2;
    })(S.root);
    return visible;
  }

  function ancestors(n) {
    const out = [];
    for (let m = n; m; m = m.parent >= 0 ? S.byId.get(m.parent) : null) out.push(m.id);
    return out;
  }

  function render() {
    const visible = layout();
    const shown = new Set(visible.map(n => n.id));
    const trail = new Set(S.selected === null ? [] : ancestors(S.byId.get(S.selected)));
    const g = S.glyph || 1, fontSize = LABEL_PX * g;
    Object.values(layers).forEach(l => l.replaceChildren());
    for (const n of visible) {
      if (n.parent < 0) continue;
      const p = S.byId.get(n.parent);
      const y0 = p.y + radius(p) + (p.children.length ? 2.4 * LABEL_PX * g : 0), y1 = n.y - radius(n) - 1, ym = (y0 + y1) / 2;
      const cls = 'edge' + (n.on_path ? ' correct' : '') + (trail.has(n.id) ? ' trail' : '');
      layers.edges.appendChild(svgEl('path', { class: cls, d: `M${p.x},${y0} C${p.x},${ym} ${n.x},${ym} ${n.x},${y1}` }));
    }
    let drawn = 0;
    for (const pair of S.tree.pairs) {
      // A negative borrowed from another tree of the question has no end here: listed in the panel only.
      if (!shownPairTypes.has(pair.type) || !shown.has(pair.chosen) || !shown.has(pair.rejected)) continue;
      const a = S.byId.get(pair.chosen), b = S.byId.get(pair.rejected);
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.max(1, Math.hypot(dx, dy));
      const bend = Math.min(80, 0.35 * len) + 12;
      const cx = (a.x + b.x) / 2 + (dy / len) * bend, cy = (a.y + b.y) / 2 - Math.abs(dx / len) * bend;
      let cls = 'pair pair-' + pair.type;
      if (S.selected !== null) cls += (pair.chosen === S.selected || pair.rejected === S.selected) ? ' focus' : ' faded';
      const path = svgEl('path', { class: cls, stroke: PAIR_COLORS[pair.type] || '#555',
                                   d: `M${a.x},${a.y} Q${cx},${cy} ${b.x},${b.y}`, 'marker-end': 'url(#arrow)' });
      path.appendChild(svgEl('title', {}, `${pair.type} pair: chosen node ${pair.chosen} (value ${fmt(pair.chosen_value)})` +
                                          ` \u2192 rejected node ${pair.rejected} (value ${fmt(pair.rejected_value)})`));
      layers.pairs.appendChild(path);
      drawn += 1;
    }
    for (const n of visible) {
      const r = radius(n), m = marker(n);
      let cls = 'node';
      if (n.terminal) cls += ' terminal';
      if (n.correct === true && n.terminal) cls += ' correct';
      if (n.correct === false && n.terminal) cls += ' incorrect';
      if (n.on_path) cls += ' onpath';
      if (n.id === S.selected) cls += ' selected';
      const group = svgEl('g', { class: cls, 'data-id': n.id, transform: `translate(${n.x},${n.y})` });
      group.appendChild(svgEl('circle', { class: 'body', r: r.toFixed(2), fill: qColor(n.q) }));
      // A terminal shows its mark (its Q is its reward, the colour says which); other nodes their Q.
      const label = svgEl('text', { class: 'label', y: (r + fontSize).toFixed(1), 'font-size': fontSize.toFixed(1) });
      label.appendChild(m ? svgEl('tspan', { class: m[0] }, m[1]) : svgEl('tspan', {}, shortNumber(n.q)));
      group.appendChild(label);
      if (n.children.length) {
        const closed = S.collapsed.has(n.id);
        const t = svgEl('g', { class: 'toggle', transform: `translate(0,${(r + 1.9 * fontSize).toFixed(1)})` });
        t.appendChild(svgEl('circle', { r: (0.5 * fontSize).toFixed(1) }));
        t.appendChild(svgEl('text', { 'font-size': (0.9 * fontSize).toFixed(1) }, closed ? '+' : '\u2212'));
        if (closed) {
          t.appendChild(svgEl('text', { class: 'count', x: (0.75 * fontSize).toFixed(1), 'font-size': (0.8 * fontSize).toFixed(1) },
                              String(n.size - 1)));
        }
        t.appendChild(svgEl('title', {}, (closed ? 'expand: ' : 'collapse: ') + (n.size - 1) + ' nodes below'));
        group.appendChild(t);
      }
      layers.nodes.appendChild(group);
    }
    const stats = document.getElementById('stats');
    stats.dataset.total = S.tree.nodes.length;
    stats.dataset.visible = visible.length;
    stats.dataset.pairsDrawn = drawn;
    const st = S.tree.stats;
    let text = `${st.nodes} nodes (${visible.length} shown) · depth ${st.max_depth} · ` +
               `\u2713 ${st.correct_terminals} \u2717 ${st.incorrect_terminals} · ${st.pairs} pairs`;
    if (st.num_tokens !== undefined) text += ` · ${st.num_tokens} tokens`;
    if (st.seconds !== undefined) text += ` · ${fmt(st.seconds, 1)} s`;
    stats.textContent = text;
  }

  function applyView() {
    viewport.setAttribute('transform', `translate(${view.x},${view.y}) scale(${view.k})`);
    // Labels go when they would be smaller than 7 px on screen.
    svg.classList.toggle('lod-low', LABEL_PX * (S.glyph || 1) * view.k < 7);
    svg.dataset.scale = view.k.toFixed(4);
    svg.dataset.labelPx = (LABEL_PX * (S.glyph || 1) * view.k).toFixed(2);
  }
  // Re-lay the tree out for the window (depth spacing, glyph size), then show all of it.
  function fit() {
    adaptToWindow();
    render();
    const box = viewport.getBBox();
    const W = svg.clientWidth || 800, H = svg.clientHeight || 600, pad = FIT_PAD;
    const k = Math.min((W - 2 * pad) / Math.max(box.width, 1), (H - 2 * pad) / Math.max(box.height, 1), 1.6);
    view.k = Math.max(k, 0.05);
    view.x = (W - box.width * view.k) / 2 - box.x * view.k;
    view.y = (H - box.height * view.k) / 2 - box.y * view.k;
    svg.dataset.size = `${W}x${H}`;
    applyView();
  }
  function zoomAt(px, py, factor) {
    const k = Math.max(0.03, Math.min(8, view.k * factor));
    view.x = px - (px - view.x) * (k / view.k);
    view.y = py - (py - view.y) * (k / view.k);
    view.k = k;
    applyView();
  }

  function updateHash() {
    const parts = [];
    if (DATA.trees.length > 1) parts.push('tree=' + S.tree.tree_index);
    if (S.selected !== null) parts.push('node=' + S.selected);
    const hash = parts.length ? '#' + parts.join('&') : '';
    if (location.hash !== hash) history.replaceState(null, '', hash || location.pathname + location.search);
  }

  function addFact(dl, name, value, field) {
    const dd = htmlEl('dd', null, value);
    dd.dataset.field = field;
    dl.append(htmlEl('dt', null, name), dd);
  }
  function section(parent, title, cls, text, tag) {
    parent.appendChild(htmlEl('h3', null, title));
    const body = htmlEl(tag || 'pre', cls, text);
    body.dataset.field = cls;
    parent.appendChild(body);
  }
  function nodeLink(id) {
    const a = htmlEl('a', null, String(id));
    a.addEventListener('click', () => select(id, true));
    return a;
  }

  function showDetail(n) {
    const panel = document.getElementById('detail');
    panel.replaceChildren();
    panel.dataset.node = n.id;
    panel.appendChild(htmlEl('h2', null, n.id === 0 ? 'Root: the question' : `Node ${n.id}` + (n.kind ? ` · ${n.kind} step` : '')));
    const dl = htmlEl('dl');
    addFact(dl, 'Q', fmt(n.q), 'q');
    addFact(dl, 'N (visits)', fmt(n.n), 'n');
    addFact(dl, 'prior', fmt(n.prior), 'prior');
    addFact(dl, 'depth', fmt(n.depth), 'depth');
    if (n.terminal) {
      addFact(dl, 'final answer', fmt(n.final_answer), 'final_answer');
      addFact(dl, 'reward', fmt(n.reward), 'reward');
      addFact(dl, 'correct', n.correct === null || n.correct === undefined ? '—' : (n.correct ? 'yes \u2713' : 'no \u2717'), 'correct');
    }
    addFact(dl, 'on a correct path', n.on_path ? 'yes' : 'no', 'on_path');
    addFact(dl, 'subtree', `${n.size} nodes, ${n.children.length} children`, 'subtree');
    panel.appendChild(dl);
    const trail = htmlEl('div', 'trail');
    trail.dataset.field = 'path';
    trail.appendChild(htmlEl('span', 'hint', 'path: '));
    ancestors(n).reverse().forEach((id, i) => { if (i) trail.appendChild(document.createTextNode(' \u2192 ')); trail.appendChild(nodeLink(id)); });
    panel.appendChild(trail);
    if (n.id === 0) {
      section(panel, 'Question', 'analysis', DATA.question, 'div');
      section(panel, 'Gold answer', 'gold', DATA.answer === null ? '—' : DATA.answer, 'div');
    } else {
      if (n.analysis) section(panel, 'Analysis', 'analysis', n.analysis, 'div');
      if (n.code !== null && n.code !== undefined) section(panel, 'Code', 'code', n.code);
      if (n.output !== null && n.output !== undefined) section(panel, 'Output', 'output', n.output);
      if (n.error) section(panel, 'Malformed step', 'error', n.error, 'div');
      const raw = htmlEl('details');
      raw.appendChild(htmlEl('summary', 'hint', 'raw step text'));
      const pre = htmlEl('pre', 'raw', n.text);
      raw.appendChild(pre);
      panel.appendChild(raw);
    }
    const pairs = S.pairsOf.get(n.id) || [];
    if (pairs.length) {
      panel.appendChild(htmlEl('h3', null, `Preference pairs (${pairs.length})`));
      const ul = htmlEl('ul');
      ul.dataset.field = 'pairs';
      pairs.forEach(p => {
        const li = htmlEl('li');
        const role = p.chosen === n.id ? 'chosen over' : 'rejected for';
        const other = p.chosen === n.id ? p.rejected : p.chosen;
        const otherTree = p.chosen === n.id ? p.rejected_tree : p.chosen_tree;
        li.append(htmlEl('span', null, `${p.type}: ${role} node `),
                  other === null ? htmlEl('span', null, `of tree #${otherTree}`) : nodeLink(other),
                  htmlEl('span', 'hint', ` (values ${fmt(p.chosen_value, 2)} vs ${fmt(p.rejected_value, 2)})`));
        ul.appendChild(li);
      });
      panel.appendChild(ul);
    }
  }

  function reveal(n) {
    for (let m = n.parent >= 0 ? S.byId.get(n.parent) : null; m; m = m.parent >= 0 ? S.byId.get(m.parent) : null) S.collapsed.delete(m.id);
  }
  function select(id, keepView) {
    const n = S.byId.get(id);
    if (!n) return;
    S.selected = id;
    reveal(n);
    render();
    showDetail(n);
    updateHash();
  }

  function buildLegend() {
    const counts = {};
    DATA.trees.forEach(t => t.pairs.forEach(p => { counts[p.type] = (counts[p.type] || 0) + 1; }));
    const row = document.getElementById('legend-pairs');
    row.replaceChildren(htmlEl('span', null, 'pairs (chosen \u2192 rejected):'));
    Object.keys(PAIR_COLORS).concat(Object.keys(counts).filter(t => !(t in PAIR_COLORS))).forEach(type => {
      const label = htmlEl('label');
      const box = htmlEl('input');
      box.type = 'checkbox';
      box.checked = shownPairTypes.has(type) || !(type in PAIR_COLORS);
      if (!(type in PAIR_COLORS)) shownPairTypes.add(type);
      box.dataset.pairType = type;
      box.addEventListener('change', () => { if (box.checked) shownPairTypes.add(type); else shownPairTypes.delete(type); render(); });
      const swatch = htmlEl('span', 'swatch');
      swatch.style.borderColor = PAIR_COLORS[type] || '#555';
      label.append(box, swatch, htmlEl('span', null, `${type} (${counts[type] || 0})`));
      row.appendChild(label);
    });
  }

  function showTree(index) {
    S = prepare(index);
    document.getElementById('tree-select').value = String(index);
    document.getElementById('legend-size').textContent = `radius \u221d \u221aN (largest N = ${S.maxN})`;
    render();
    if (S.selected !== null) showDetail(S.byId.get(S.selected));
    else document.getElementById('detail').replaceChildren(htmlEl('p', 'hint', 'Click a node to see its step: analysis, code, output, Q, N, prior.'));
    fit();
    updateHash();
  }

  function init() {
    document.getElementById('question').textContent = DATA.question;
    document.getElementById('gold').textContent = DATA.answer === null ? '—' : DATA.answer;
    const select_ = document.getElementById('tree-select');
    DATA.trees.forEach((t, i) => {
      const o = htmlEl('option', null, `#${t.tree_index}: ${t.stats.nodes} nodes, \u2713${t.stats.correct_terminals} \u2717${t.stats.incorrect_terminals}`);
      o.value = String(i);
      select_.appendChild(o);
    });
    select_.addEventListener('change', () => showTree(Number(select_.value)));
    buildLegend();
    document.getElementById('fit').addEventListener('click', fit);
    document.getElementById('zoom-in').addEventListener('click', () => zoomAt(svg.clientWidth / 2, svg.clientHeight / 2, 1.3));
    document.getElementById('zoom-out').addEventListener('click', () => zoomAt(svg.clientWidth / 2, svg.clientHeight / 2, 1 / 1.3));
    document.getElementById('expand-all').addEventListener('click', () => { S.collapsed.clear(); fit(); });
    document.getElementById('collapse-depth').addEventListener('click', () => {
      const k = Math.max(0, parseInt(document.getElementById('depth').value, 10) || 0);
      S.collapsed = collapseFrom(S.tree.nodes, k, false);
      if (S.selected !== null && !layout().includes(S.byId.get(S.selected))) S.selected = null;
      fit();
    });

    layers.nodes.addEventListener('click', e => {
      const g = e.target.closest('.node');
      if (!g) return;
      const id = Number(g.dataset.id);
      if (e.target.closest('.toggle')) {
        if (S.collapsed.has(id)) S.collapsed.delete(id); else S.collapsed.add(id);
        render();
      } else {
        select(id, true);
      }
    });
    const tip = document.getElementById('tooltip');
    layers.nodes.addEventListener('mousemove', e => {
      const g = e.target.closest('.node');
      if (!g) { tip.hidden = true; return; }
      const n = S.byId.get(Number(g.dataset.id));
      let text = `node ${n.id} · Q ${fmt(n.q, 3)} · N ${n.n} · prior ${fmt(n.prior, 3)}`;
      if (n.terminal) text += ` · answer ${fmt(n.final_answer)}`;
      const body = n.id === 0 ? DATA.question : (n.analysis || n.text || '');
      if (body) text += '\n' + (body.length > 220 ? body.slice(0, 220) + '\u2026' : body);
      tip.textContent = text;
      const box = svg.getBoundingClientRect();
      tip.style.left = (e.clientX - box.left + 14) + 'px';
      tip.style.top = (e.clientY - box.top + 14) + 'px';
      tip.hidden = false;
    });
    layers.nodes.addEventListener('mouseleave', () => { tip.hidden = true; });

    svg.addEventListener('wheel', e => {
      e.preventDefault();
      const box = svg.getBoundingClientRect();
      zoomAt(e.clientX - box.left, e.clientY - box.top, Math.exp(-e.deltaY * 0.0015));
    }, { passive: false });
    let drag = null;
    svg.addEventListener('pointerdown', e => {
      if (e.target.closest('.node')) return;
      drag = { x: e.clientX, y: e.clientY, vx: view.x, vy: view.y };
      svg.classList.add('dragging');
      svg.setPointerCapture(e.pointerId);
    });
    svg.addEventListener('pointermove', e => {
      if (!drag) return;
      view.x = drag.vx + e.clientX - drag.x;
      view.y = drag.vy + e.clientY - drag.y;
      applyView();
    });
    const stop = () => { drag = null; svg.classList.remove('dragging'); };
    svg.addEventListener('pointerup', stop);
    svg.addEventListener('pointercancel', stop);
    window.addEventListener('resize', fit);

    // URL hash: #tree=<tree_index>&node=<node_id>&expand=all&depth=<k>
    const params = new URLSearchParams(location.hash.slice(1));
    let index = 0;
    if (params.has('tree')) {
      const found = DATA.trees.findIndex(t => String(t.tree_index) === params.get('tree'));
      if (found >= 0) index = found;
    }
    S = prepare(index);
    if (params.get('expand') === 'all') S.collapsed.clear();
    if (params.has('depth')) S.collapsed = collapseFrom(S.tree.nodes, Math.max(0, parseInt(params.get('depth'), 10) || 0), false);
    if (params.has('node')) {
      const n = S.byId.get(Number(params.get('node')));
      if (n) { S.selected = n.id; reveal(n); }
    }
    showTree(index);
  }
  init();
})();
"""
