/* fastapi-deploy dashboard: the little that needs a script. Pages are complete without it (the server
   renders every table, log and picture); this adds live updates and conveniences:
     [data-autosubmit]   a select that sends its form when changed
     [data-confirm]      a form that asks first
     [data-live]         the instances table and autoscaler figures, refreshed every few seconds
     [data-buildlog]     a running deployment's build log, streamed (NDJSON over fetch)
     [data-logs]         the app's log lines, followed live, with pause
   Everything is written with textContent: nothing from the server is parsed as HTML. */
(() => {
  "use strict";
  document.documentElement.classList.add("js");

  const leaving = new AbortController();
  window.addEventListener("pagehide", () => leaving.abort());
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const aborted = (err) => leaving.signal.aborted || (err && err.name === "AbortError");

  class HttpError extends Error {
    constructor(status) {
      super("HTTP " + status);
      this.status = status;
    }
  }

  function toLogin() {
    location.assign("/dashboard/login?next=" + encodeURIComponent(location.pathname + location.search));
  }

  async function getJSON(url) {
    const res = await fetch(url, { signal: leaving.signal, credentials: "same-origin", cache: "no-store" });
    if (!res.ok) throw new HttpError(res.status);
    return res.json();
  }

  /* Read an NDJSON response as it arrives; onItem gets each object. Resolves when the server ends it. */
  async function ndjson(url, onItem) {
    const res = await fetch(url, {
      signal: leaving.signal,
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/x-ndjson" },
    });
    if (!res.ok) throw new HttpError(res.status);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (line) onItem(JSON.parse(line));
      }
    }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function badge(text, tone) {
    return el("span", "badge " + (tone || "muted"), String(text).replace(/_/g, " "));
  }

  const TONES = {
    success: "ok", serving: "ok", verifying_skipped: "ok",
    new: "muted", stopped: "muted",
    degraded: "warn", draining: "warn", warm: "warn", build_skipped_superseded: "warn", upload_cancelled: "warn",
    waiting_upload: "busy", ready_for_build: "busy", building: "busy", extracting: "busy",
    building_image: "busy", deploying: "busy", verifying: "busy", starting: "busy", deploying_app: "busy",
  };
  const tone = (status) => TONES[status] || "bad";

  function nearBottom(box) {
    return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  }

  /* -- conveniences ------------------------------------------------------------------------------ */

  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form && select.form.requestSubmit());
  }
  document.addEventListener("submit", (event) => {
    const message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });
  for (const input of document.querySelectorAll("input[data-select]")) {
    input.addEventListener("focus", () => input.select());
  }

  /* -- live instances ------------------------------------------------------------------------------ */

  function renderInstances(body, instances) {
    const rows = instances.map((i) => {
      const tr = el("tr");
      tr.dataset.instance = i.id;
      tr.dataset.state = i.state;
      const id = el("th", "mono", i.id.slice(0, 12));
      id.scope = "row";
      const state = el("td");
      state.append(badge(i.state, i.tone));
      if (i.oom) state.append(" ", badge("out of memory", "bad"));
      const rev = el("td", "mono", i.deployment_slug);
      if (!i.current) rev.append(" ", el("span", "muted", "(old)"));
      tr.append(id, state, rev, el("td", "", i.started_ago), el("td", "num", i.in_flight),
        el("td", "mono muted", "pid " + i.pid + " · :" + i.port));
      return tr;
    });
    if (!rows.length) {
      const tr = el("tr", "none");
      const td = el("td", "muted", "No instances right now.");
      td.colSpan = 6;
      tr.append(td);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  async function pollLive(section) {
    const body = section.querySelector("[data-instances-body]");
    const status = document.querySelector("[data-app-status]");
    const facts = section.querySelector("[data-scaling]");
    for (;;) {
      await sleep(document.hidden ? 10000 : 2000);
      let data;
      try {
        data = await getJSON(section.dataset.live);
      } catch (err) {
        if (aborted(err)) return;
        if (err.status === 401) return toLogin();
        continue;
      }
      if (body) renderInstances(body, data.instances);
      if (status) status.replaceChildren(badge(data.status, data.status_tone || tone(data.status)));
      if (facts && data.scaling) {
        for (const node of section.querySelectorAll("[data-k]")) {
          const value = data.scaling[node.dataset.k];
          if (node.dataset.k === "panic") node.textContent = value ? "panic" : "stable";
          else if (node.dataset.k === "reason") node.textContent = value || "";
          else node.textContent = value === null || value === undefined ? "–" : String(value);
        }
      }
    }
  }

  /* -- a deployment's build log ---------------------------------------------------------------------- */

  function seconds(v) {
    if (v === null || v === undefined) return "–";
    if (v < 1) return Math.round(v * 1000) + " ms";
    if (v < 60) return v.toFixed(1) + " s";
    return Math.floor(v / 60) + " min " + Math.floor(v % 60) + " s";
  }

  async function refreshDeployment() {
    const section = document.querySelector("[data-status-url]");
    if (!section) return;
    const dep = await getJSON(section.dataset.statusUrl);
    const holder = section.querySelector("[data-dep-status]");
    if (holder) holder.replaceChildren(badge(dep.status, tone(dep.status)));
    const duration = section.querySelector("[data-dep-duration]");
    if (duration) duration.textContent = seconds(dep.duration_seconds);
    const failure = section.querySelector("[data-dep-failure]");
    if (failure && dep.failure) {
      const box = el("div", "problem");
      box.setAttribute("role", "alert");
      const p = el("p");
      p.append(el("strong", "", dep.failure.error_title), " " + dep.failure.error_message);
      box.append(p);
      if (dep.failure.error_hint) box.append(el("p", "hint", dep.failure.error_hint));
      failure.replaceChildren(box);
    }
    for (const dot of document.querySelectorAll("#log-h .live-dot")) dot.remove();
  }

  async function followBuildLog(pre) {
    let lastId = pre.dataset.lastId || "";
    for (let attempt = 0; attempt < 100; attempt++) {
      let ended = false;
      const url = pre.dataset.stream + (lastId ? "?last_id=" + encodeURIComponent(lastId) : "");
      try {
        await ndjson(url, (item) => {
          if (item.id) lastId = item.id;
          if (item.type === "message") {
            const stick = nearBottom(pre);
            pre.append(el("span", "line", item.message), "\n");
            if (stick) pre.scrollTop = pre.scrollHeight;
          } else if (item.type === "complete" || item.type === "failed") {
            ended = true;
          }
        });
      } catch (err) {
        if (aborted(err)) return;
        if (err.status === 401) return toLogin();
        await sleep(2000);
      }
      if (ended) {
        pre.dataset.ended = "1";
        try {
          await refreshDeployment();
        } catch (err) {
          if (!aborted(err)) pre.dataset.ended = "status-unknown";
        }
        return;
      }
    }
  }

  /* -- the app's logs ---------------------------------------------------------------------------------- */

  const MAX_LOG_LINES = 5000;

  function logLine(entry) {
    const li = el("li", "lv-" + (entry.level || "info"));
    const time = el("time", "", String(entry.timestamp || "").slice(0, 19).replace("T", " "));
    time.dateTime = entry.timestamp || "";
    li.append(time, " ", el("span", "lv", entry.level || ""), " ",
      el("span", "src", String(entry.instance_id || entry.stream || "").slice(0, 8)), " ",
      el("span", "msg", entry.message));
    return li;
  }

  async function followLogs(list) {
    const state = document.querySelector("[data-log-state]");
    const count = document.querySelector("[data-log-count]");
    const pause = document.querySelector("[data-log-pause]");
    const url = new URL(list.dataset.stream, location.href);
    let paused = false;
    let held = [];
    const show = (entries) => {
      const stick = nearBottom(list);
      for (const entry of entries) list.append(logLine(entry));
      while (list.children.length > MAX_LOG_LINES) list.firstElementChild.remove();
      if (count) count.textContent = String(list.children.length);
      const empty = document.querySelector("[data-log-empty]");
      if (empty && list.children.length) empty.remove();
      if (stick) list.scrollTop = list.scrollHeight;
    };
    if (pause) {
      pause.addEventListener("click", () => {
        paused = !paused;
        pause.setAttribute("aria-pressed", String(paused));
        pause.textContent = paused ? "Resume" : "Pause";
        if (state) state.textContent = paused ? "paused" : "live";
        if (!paused) {
          show(held);
          held = [];
        }
      });
    }
    list.scrollTop = list.scrollHeight;
    for (;;) {
      try {
        await ndjson(url.toString(), (entry) => {
          if (entry.type === "heartbeat") return;
          url.searchParams.set("after", entry.timestamp);
          if (paused) held.push(entry);
          else show([entry]);
        });
      } catch (err) {
        if (aborted(err)) return;
        if (err.status === 401) return toLogin();
        if (state) state.textContent = "reconnecting";
      }
      await sleep(2000);
      if (state && !paused) state.textContent = "live";
    }
  }

  const live = document.querySelector("[data-live]");
  if (live) pollLive(live);
  const buildlog = document.querySelector("pre[data-buildlog][data-stream]");
  if (buildlog) followBuildLog(buildlog);
  const logs = document.querySelector("ol[data-logs][data-stream]");
  if (logs) followLogs(logs);
})();
