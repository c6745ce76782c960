/* The metrics page's charts: the series the server put in #metrics-data, drawn with the vendored uPlot
   (static/vendor/uplot), refreshed from the page's metrics.json. Hovering a chart shows each series'
   value at that time in its legend. window.fdpCharts holds the charts by name (tests read them). */
(() => {
  "use strict";
  const root = document.querySelector("[data-metrics]");
  const source = document.getElementById("metrics-data");
  if (!root || !source || !window.uPlot) return;

  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const fixed = (digits) => (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(digits));
  const ms = (v) => (v >= 1000 ? (v / 1000).toFixed(2) + " s" : fixed(1)(v) + " ms");
  const stepped = uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined;

  const CHARTS = {
    rps: { series: [["rps", "requests/s", "--chart-1"]], value: fixed(2) },
    errors: { series: [["error_rate", "errors", "--bad-fg"]], scale: 100, value: (v) => fixed(2)(v) + " %" },
    latency: {
      series: [["p50_ms", "p50", "--chart-1"], ["p95_ms", "p95", "--chart-2"], ["p99_ms", "p99", "--chart-3"]],
      value: ms,
    },
    instances: {
      series: [["instances", "serving", "--chart-1"], ["warm", "warm", "--chart-2"]],
      value: (v) => v.toFixed(0),
      paths: stepped,
      incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
    },
    concurrency: {
      series: [["concurrency_avg", "average", "--chart-1"], ["concurrency_max", "peak", "--chart-2"]],
      value: fixed(2),
    },
  };

  function columns(data, spec) {
    const scale = spec.scale || 1;
    return [
      data.timestamps,
      ...spec.series.map(([key]) => (data[key] || []).map((v) => (v === null || v === undefined ? null : v * scale))),
    ];
  }

  function options(spec, width) {
    const grid = { stroke: color("--border"), width: 1 };
    return {
      width,
      height: 220,
      series: [
        {},
        ...spec.series.map(([, label, stroke]) => ({
          label,
          stroke: color(stroke),
          width: 1.5,
          paths: spec.paths,
          points: { show: false },
          value: (u, v) => (v === null || v === undefined ? "–" : spec.value(v)),
        })),
      ],
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [
        { stroke: color("--muted"), grid, ticks: grid },
        {
          stroke: color("--muted"),
          grid,
          ticks: grid,
          size: 64,
          incrs: spec.incrs,
          values: (u, ticks) => ticks.map((t) => spec.value(t)),
        },
      ],
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
    };
  }

  const charts = {};
  window.fdpCharts = charts;
  const plots = [...root.querySelectorAll("[data-chart]")];
  const width = (node) => Math.max(240, node.clientWidth);

  function draw(data) {
    for (const node of plots) {
      const key = node.dataset.chart;
      const spec = CHARTS[key];
      if (!spec) continue;
      if (charts[key]) charts[key].setData(columns(data, spec));
      else charts[key] = new uPlot(options(spec, width(node)), columns(data, spec), node);
    }
  }

  draw(JSON.parse(source.textContent));

  if (window.ResizeObserver) {
    let pending = 0;
    new ResizeObserver(() => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => {
        for (const node of plots) {
          const chart = charts[node.dataset.chart];
          if (chart && chart.width !== width(node)) chart.setSize({ width: width(node), height: 220 });
        }
      });
    }).observe(root);
  }

  const leaving = new AbortController();
  window.addEventListener("pagehide", () => leaving.abort());
  const every = Math.max(5, Number(root.dataset.refresh) || 10) * 1000;
  async function refresh() {
    if (!document.hidden) {
      try {
        const res = await fetch(root.dataset.metrics, { signal: leaving.signal, cache: "no-store", credentials: "same-origin" });
        if (res.ok) {
          const body = await res.json();
          draw(body.data);
          for (const node of document.querySelectorAll("[data-figure]")) {
            const text = body.figures[node.dataset.figure];
            if (text !== undefined) node.textContent = text;
          }
        }
      } catch (err) {
        if (leaving.signal.aborted) return;
      }
    }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();
