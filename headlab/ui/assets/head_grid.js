// The clickable layers x heads grid of the Heads and Prune pages (mounted by headlab/ui/head_grid.py,
// which documents `data`). A click toggles one head.
//
// Why not a plotly chart: a chart's selection holds one click, so two clicks made while the app
// is still busy with an earlier one replace each other before the server sees the first. Here
// every click gets a sequence number and stays in this grid's `clicks` state until the server
// acknowledges it (data.applied[grid id] >= seq): the state the server reads always holds every
// click it has not applied yet, so none is lost, and the server applies each one once, in order.
// Until then the cell shows its expected state at once (optimistic), so fast clicks look right.

export default function (component) {
  const { data, setStateValue, parentElement } = component;
  const grid = parentElement.__headGrid || (parentElement.__headGrid = mount(parentElement));
  grid.send = setStateValue;
  render(grid, data);
}

function mount(root) {
  const grid = {
    // New with every mount (page load, page switch): the server keeps its acknowledgements per grid id.
    id: Math.random().toString(36).slice(2) + Date.now().toString(36),
    seq: 0,
    pending: [], // [seq, layer, head] not yet acknowledged
    data: null,
    shape: "",
    box: document.createElement("div"),
  };
  grid.box.className = "hg";
  root.appendChild(grid.box);
  grid.box.addEventListener("click", (event) => {
    const cell = event.target.closest(".cell");
    if (!cell || !grid.data) return;
    grid.seq += 1;
    grid.pending.push([grid.seq, +cell.dataset.layer, +cell.dataset.head]);
    grid.send("clicks", { grid: grid.id, events: grid.pending.map((e) => e.slice()) });
    paint(grid);
  });
  grid.box.addEventListener("mouseover", (event) => {
    const cell = event.target.closest(".cell");
    if (cell) showTip(grid, cell);
  });
  grid.box.addEventListener("mouseleave", () => {
    grid.tip.style.display = "none";
  });
  return grid;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function build(grid, d) {
  const box = grid.box;
  box.replaceChildren();
  box.appendChild(el("div", "title", d.title));
  const table = el("div", "grid");
  table.style.gridTemplateColumns = `2.2em repeat(${d.heads}, minmax(0, 1fr))`;
  table.style.gridAutoRows = `${d.cell_px}px`;
  table.appendChild(el("div", "axis", "layer \\ head"));
  for (let h = 0; h < d.heads; h++) table.appendChild(el("div", "hlabel", String(h)));
  grid.cells = [];
  const every = d.layers <= 32 ? 1 : 4;
  for (let l = 0; l < d.layers; l++) {
    table.appendChild(el("div", "llabel", l % every === 0 ? String(l) : ""));
    for (let h = 0; h < d.heads; h++) {
      const cell = el("div", "cell");
      cell.dataset.layer = l;
      cell.dataset.head = h;
      if (d.group > 1 && h > 0 && h % d.group === 0) cell.classList.add("kv");
      table.appendChild(cell);
      grid.cells.push(cell);
    }
  }
  box.appendChild(table);
  const bar = el("div", "bar");
  bar.appendChild(el("div", "scale"));
  bar.appendChild(el("div", "ticks"));
  bar.appendChild(el("div", "bartitle"));
  box.appendChild(bar);
  grid.tip = el("div", "tip");
  box.appendChild(grid.tip);
}

function render(grid, d) {
  if (!d) return;
  const shape = `${d.layers}x${d.heads}x${d.group}x${d.cell_px}`;
  if (shape !== grid.shape) {
    build(grid, d);
    grid.shape = shape;
  }
  grid.data = d;
  const acked = (d.applied && d.applied[grid.id]) || 0;
  grid.pending = grid.pending.filter((e) => e[0] > acked);
  grid.box.querySelector(".title").textContent = d.title;
  grid.cells.forEach((cell, i) => {
    cell.style.background = d.colors[i];
  });
  const bar = grid.box.querySelector(".bar");
  bar.querySelector(".scale").style.background = `linear-gradient(to right, ${d.bar.stops.join(", ")})`;
  const ticks = bar.querySelector(".ticks");
  ticks.replaceChildren(
    ...d.bar.ticks.map(([pos, label]) => {
      const tick = el("span", "tick", label);
      tick.style.left = `${100 * pos}%`;
      tick.style.transform = `translateX(-${100 * pos}%)`;
      return tick;
    })
  );
  bar.querySelector(".bartitle").textContent = d.bar.title;
  paint(grid);
  if (grid.tipCell && grid.tipCell.isConnected && grid.tip.style.display === "block") showTip(grid, grid.tipCell);
}

// Pruned marks: the server's mask, with this grid's unacknowledged clicks applied on top.
function paint(grid) {
  const d = grid.data;
  if (!d.pruned) return;
  const flips = new Set();
  for (const [, l, h] of grid.pending) {
    const i = l * d.heads + h;
    if (flips.has(i)) flips.delete(i);
    else flips.add(i);
  }
  grid.cells.forEach((cell, i) => {
    const pruned = Boolean(d.pruned[i]) !== flips.has(i);
    cell.textContent = pruned ? "\u00d7" : "";
    cell.classList.toggle("pruned", pruned);
  });
}

function showTip(grid, cell) {
  const d = grid.data;
  if (!d) return;
  const i = +cell.dataset.layer * d.heads + +cell.dataset.head;
  grid.tipCell = cell;
  grid.tip.textContent = d.hover[i];
  grid.tip.style.display = "block";
  const left = Math.min(cell.offsetLeft + cell.offsetWidth, grid.box.clientWidth - grid.tip.offsetWidth);
  grid.tip.style.left = `${Math.max(0, left)}px`;
  grid.tip.style.top = `${cell.offsetTop + cell.offsetHeight + 2}px`;
}
