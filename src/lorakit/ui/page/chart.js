// A small line chart on a <canvas>: several series of (x, y) points, linear axes with round
// ticks, a legend. After each draw the canvas carries data-points (points drawn, all series)
// and data-series (series drawn), which the page's tests read.
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

// Round tick values covering [lo, hi], about `count` of them.
function niceTicks(lo, hi, count) {
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const raw = (hi - lo) / Math.max(count, 1);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

function formatTick(value) {
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e5)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

class LineChart {
  constructor(canvas, title) {
    this.canvas = canvas;
    this.title = title;
    this.series = [];
  }

  // series: [{name, points: [[x, y], ...]}]; points with a non-finite y are left out.
  setSeries(series) {
    this.series = series.map((s) => ({
      name: s.name,
      points: s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1])),
    }));
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 400;
    const height = canvas.clientHeight || 220;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "12px system-ui, sans-serif";
    g.fillStyle = "#111827";
    g.fillText(this.title, 8, 14);

    const drawn = this.series.filter((s) => s.points.length > 0);
    const all = drawn.flatMap((s) => s.points);
    canvas.dataset.points = String(all.length);
    canvas.dataset.series = String(drawn.length);
    if (all.length === 0) {
      g.fillStyle = "#6b7280";
      g.fillText("no data yet", width / 2 - 30, height / 2);
      return;
    }
    const xs = niceTicks(Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0])), 6);
    const ys = niceTicks(Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1])), 4);
    const legend = this.legendRows(g, width);
    const left = 8 + Math.max(...ys.map((t) => g.measureText(formatTick(t)).width)) + 6;
    const box = { left, right: width - 12, top: 10 + 16 * legend.rows, bottom: height - 34 };
    const sx = (x) => box.left + ((x - xs[0]) / (xs[xs.length - 1] - xs[0])) * (box.right - box.left);
    const sy = (y) => box.bottom - ((y - ys[0]) / (ys[ys.length - 1] - ys[0])) * (box.bottom - box.top);

    g.strokeStyle = "#e5e7eb";
    g.fillStyle = "#374151";
    g.lineWidth = 1;
    for (const t of ys) {
      g.beginPath(); g.moveTo(box.left, sy(t)); g.lineTo(box.right, sy(t)); g.stroke();
      g.fillText(formatTick(t), 8, sy(t) + 4);
    }
    for (const t of xs) {
      const label = formatTick(t);
      g.fillText(label, sx(t) - g.measureText(label).width / 2, box.bottom + 14);
    }
    g.fillText("step", box.right - 24, box.bottom + 28);

    this.series.forEach((s, i) => {
      const color = PALETTE[i % PALETTE.length];
      g.strokeStyle = color;
      g.fillStyle = color;
      g.lineWidth = 2;
      g.beginPath();
      s.points.forEach(([x, y], j) => (j ? g.lineTo(sx(x), sy(y)) : g.moveTo(sx(x), sy(y))));
      g.stroke();
      if (s.points.length === 1) {
        g.beginPath(); g.arc(sx(s.points[0][0]), sy(s.points[0][1]), 3, 0, 2 * Math.PI); g.fill();
      }
      const [x, y] = legend.places[i];
      g.fillRect(x, y - 5, 10, 3);
      g.fillStyle = "#374151";
      g.fillText(s.name, x + 14, y);
    });
  }

  // Where each series' legend entry goes: after the title, wrapping onto more rows.
  legendRows(g, width) {
    let x = 24 + g.measureText(this.title).width;
    let row = 0;
    const places = this.series.map((s) => {
      const size = 24 + g.measureText(s.name).width;
      if (x + size > width - 8 && x > 8) { row += 1; x = 8; }
      const place = [x, 14 + 16 * row];
      x += size;
      return place;
    });
    return { places, rows: row + 1 };
  }
}

window.LineChart = LineChart;
