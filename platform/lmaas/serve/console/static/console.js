// The lmaas web console: plain JavaScript, no build step, no other origin.
// Every view is a call to the gateway's own `/api/v1` or `/v1` routes with the key the user typed in,
// kept in this tab's sessionStorage and sent only as `Authorization: Bearer`. The server renders
// empty page shells (serve/console/templates); this script fills them. Data goes into the page as
// text nodes only (`h` below), never as HTML.
"use strict";

(function () {
  const KEY = "lmaas.console.key";
  const FLASH = "lmaas.console.flash";
  const NEXT = "lmaas.console.next";
  const INVALID_KEY = "This API key is not valid or has expired. Enter a valid key to continue.";
  const body = document.body;
  const PAGE = body.dataset.page;
  const ROOT = body.dataset.root || "/console";

  // ---- the API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param || null;
    }
  }

  function storedKey() {
    return sessionStorage.getItem(KEY);
  }

  /** Forget the key and go back to the key form, with `message` shown there. */
  function logout(message) {
    sessionStorage.removeItem(KEY);
    if (message) sessionStorage.setItem(FLASH, message);
    if (PAGE !== "login") sessionStorage.setItem(NEXT, location.pathname);
    location.assign(ROOT + "/login");
  }

  async function errorOf(response) {
    let text = "";
    try {
      text = await response.text();
      const parsed = JSON.parse(text);
      if (parsed && parsed.error && parsed.error.message) return new ApiError(response.status, parsed.error.message, parsed.error.param);
    } catch (_) { /* not the API's JSON error: say what came back */ }
    const head = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 160);
    return new ApiError(response.status, `the gateway answered ${response.status} ${response.statusText}${head ? ": " + head : ""}`);
  }

  /** fetch() with the key; a 401 anywhere sends the user back to the key form with one message. */
  async function call(path, options = {}, key = storedKey()) {
    const headers = Object.assign({}, options.headers || {}, { Authorization: "Bearer " + key });
    const init = Object.assign({}, options, { headers });
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.json);
      delete init.json;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "the gateway did not answer; is it running?");
    }
    if (response.status === 401 && PAGE !== "login") {
      logout(INVALID_KEY);
      throw new ApiError(401, INVALID_KEY);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function api(path, options) {
    return (await call(path, options)).json();
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return `Something went wrong in the console: ${err && err.message ? err.message : err}`;
    if (err.status === 401) return INVALID_KEY;
    if (err.status === 403) return `Not allowed: ${err.message}`;
    if (err.status === 404) return `Not found: ${err.message}`;
    if (err.status === 429) return `Too many requests: ${err.message}`;
    if (err.status === 0) return `No answer: ${err.message}`;
    return err.message;
  }

  // ---- page helpers ----------------------------------------------------------------------

  /** An element with attributes (`on*` are listeners) and children (strings become text nodes). */
  function h(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  function svg(tag, attrs, ...children) {
    return build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
  }

  function build(el, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const $ = (id) => document.getElementById(id);

  function fill(id, ...children) {
    const el = typeof id === "string" ? $(id) : id;
    el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
    return el;
  }

  function showError(err, where) {
    if (err && err.name === "AbortError") return;
    if (err instanceof ApiError && err.status === 401 && PAGE !== "login") return; // on its way to the key form
    const message = typeof err === "string" ? err : describe(err);
    const box = where || $("error");
    box.textContent = message;
    box.hidden = false;
    if (!(err instanceof ApiError)) console.error(err);
  }

  function clearError() {
    const box = $("error");
    box.hidden = true;
    box.textContent = "";
  }

  function say(message) {
    $("status").textContent = message;
  }

  /** A table: `columns` are [header, className?]; rows are arrays of cells (text or nodes). */
  function table(caption, columns, rows, empty) {
    if (!rows.length) return h("p", { class: "empty" }, empty || "Nothing here yet.");
    return h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, columns.map(([label, cls]) => h("th", { scope: "col", class: cls }, label)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((cell, i) => h("td", { class: columns[i][1] }, cell))))));
  }

  function summary(id, pairs) {
    fill(id, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "" && !(Array.isArray(v) && !v.length)).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    let v = n;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return `${i ? v.toFixed(v < 10 ? 2 : 1) : v} ${units[i]}`;
  }

  function when(seconds) {
    if (!seconds) return "-";
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function number(v) {
    if (typeof v !== "number") return String(v);
    return Number.isInteger(v) ? v.toLocaleString("en-US") : v.toPrecision(4);
  }

  function badge(text, kind) {
    return h("span", { class: `badge ${kind || ""}` }, text);
  }

  function link(href, text, attrs) {
    return h("a", Object.assign({ href }, attrs || {}), text);
  }

  const modelHref = (name) => `${ROOT}/models/${encodeURIComponent(name)}`;
  const versionHref = (name, v) => `${modelHref(name)}/versions/${v}`;
  const modelPath = (name) => `/api/v1/models/${encodeURIComponent(name)}`;

  function refHref(ref) {
    const m = /^(.+):(\d+)$/.exec(ref || "");
    return m ? versionHref(m[1], m[2]) : null;
  }

  function stateBadge(state) {
    const kind = { succeeded: "ok", ready: "ok", promoted: "ok", running: "ok", done: "ok", HEALTHY: "ok", RUNNING: "ok",
      queued: "warn", submitted: "warn", pending: "warn", applying: "warn", UPDATING: "warn", DEPLOYING: "warn",
      failed: "bad", rolled_back: "bad", cancelled: "bad", archived: "bad", UNHEALTHY: "bad", DEPLOY_FAILED: "bad" }[state];
    return badge(state, kind);
  }

  /** Run `fn` now and every `ms` while the tab is visible (bounded: stops when the page goes away). */
  function every(ms, fn) {
    let timer = null;
    let failed = false; // a failed refresh's message goes once one succeeds again (an action's message stays)
    const tick = async () => {
      if (document.visibilityState === "visible") {
        try {
          await fn();
          if (failed) clearError();
          failed = false;
        } catch (err) {
          failed = true;
          showError(err);
        }
      }
      timer = setTimeout(tick, ms);
    };
    tick();
    window.addEventListener("pagehide", () => clearTimeout(timer));
  }

  // ---- pages ------------------------------------------------------------------------------

  const pages = {};

  pages.login = function () {
    const flash = sessionStorage.getItem(FLASH);
    if (flash) {
      showError(flash);
      sessionStorage.removeItem(FLASH);
    }
    const input = $("api-key");
    input.focus();
    $("login-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      clearError();
      const key = input.value.trim();
      if (!key) return showError("Enter an API key.");
      say("Checking the key...");
      try {
        // any valid key may read its own tenant's usage: a 401 here is the only "no"
        await call("/api/v1/usage?since=" + new Date().toISOString().slice(0, 10), {}, key);
      } catch (err) {
        say("");
        if (err instanceof ApiError && err.status === 401) {
          input.value = "";
          return showError(INVALID_KEY);
        }
        if (!(err instanceof ApiError) || err.status === 0 || err.status >= 500) return showError(err); // a 403 or 400 is still a valid key
      }
      sessionStorage.setItem(KEY, key);
      const next = sessionStorage.getItem(NEXT);
      sessionStorage.removeItem(NEXT);
      location.assign(next && next.startsWith(ROOT + "/") && !next.startsWith(ROOT + "/login") ? next : ROOT + "/models");
    });
  };

  pages.models = function () {
    const input = $("model-search");
    let timer = null;
    let shown = 0;
    const load = async () => {
      const search = input.value.trim();
      const mine = ++shown;
      const query = search ? `?limit=200&search=${encodeURIComponent(search)}` : "?limit=200";
      const models = (await api("/api/v1/models" + query)).data;
      // for the first 50 models: the newest version (task, size); aliases come with the listing
      const details = await Promise.all(models.slice(0, 50).map(async (m) => {
        try {
          return (await api(`${modelPath(m.name)}/versions?limit=1`)).data[0] || null;
        } catch (err) {
          return null;
        }
      }));
      if (mine !== shown) return; // a newer search answered first
      const rows = models.map((m, i) => {
        const latest = details[i] || null;
        return [
          link(modelHref(m.name), m.name),
          m.tenant,
          m.public ? badge("public", "ok") : badge("private"),
          latest ? link(versionHref(m.name, latest.version), String(m.latest_version)) : String(m.latest_version),
          latest ? latest.task : "-",
          latest ? bytes(latest.size) : "-",
          Object.entries(m.aliases || {}).map(([alias, v]) => badge(`@${alias} \u2192 ${v}`)),
          when(m.created_at),
        ];
      });
      fill("models", table(`${models.length} model${models.length === 1 ? "" : "s"}${search ? ` matching \u201c${search}\u201d` : ""}`,
        [["Name"], ["Tenant"], ["Visibility"], ["Latest", "num"], ["Task"], ["Size", "num"], ["Aliases"], ["Created"]], rows,
        search ? `No model you can see matches \u201c${search}\u201d.` : "No models visible to this key."));
      say("");
    };
    const run = () => load().catch(showError);
    $("model-search-form").addEventListener("submit", (event) => { event.preventDefault(); run(); });
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 250); });
    say("Loading models...");
    run();
  };

  pages.model = async function () {
    const name = body.dataset.name;
    const [model, page] = await Promise.all([api(modelPath(name)), api(`${modelPath(name)}/versions?limit=100`)]);
    summary("model-summary", [
      ["Tenant", model.tenant], ["Visibility", model.public ? "public (every tenant may read and call it)" : "private"],
      ["Latest version", String(model.latest_version)], ["Created", when(model.created_at)], ["Description", model.description],
      ["Tags", Object.entries(model.tags || {}).map(([k, v]) => badge(`${k}=${v}`))],
    ]);
    const byVersion = {};
    for (const [alias, v] of Object.entries(model.aliases || {})) (byVersion[v] = byVersion[v] || []).push(alias);
    fill("versions", table(page.has_more ? "the newest 100 versions" : null,
      [["Version", "num"], ["Status"], ["Task"], ["Size", "num"], ["Aliases"], ["Signed"], ["Parent"], ["Metrics"], ["Created"]],
      page.data.map((v) => [
        link(versionHref(name, v.version), String(v.version)), stateBadge(v.status), v.task, bytes(v.size),
        (byVersion[v.version] || []).map((a) => badge("@" + a)),
        v.signed ? badge("signed", "ok") : badge("not signed", "warn"),
        v.parent ? (refHref(v.parent) ? link(refHref(v.parent), v.parent) : v.parent) : "-",
        Object.entries(v.metrics).slice(0, 4).map(([k, x]) => `${k} ${number(x)}`).join(", ") || "-",
        when(v.created_at),
      ]), "This model has no versions."));
  };

  pages.version = async function () {
    const name = body.dataset.name;
    const number_ = Number(body.dataset.version);
    const path = `${modelPath(name)}/versions/${number_}`;
    const [v, lineage] = await Promise.all([api(path), api(`${path}/lineage`)]);
    summary("version-summary", [
      ["Reference", h("code", {}, v.ref)], ["Status", stateBadge(v.status)], ["Task", v.task], ["Size", bytes(v.size)],
      ["Tenant", v.tenant], ["Created", when(v.created_at)],
      ["Signature", v.signed ? badge("signed (name, version and manifest, Ed25519)", "ok") : badge("not signed", "warn")],
      ["Encrypted", v.encrypted ? "yes" : "no"], ["Manifest sha256", h("code", { class: "sha" }, v.manifest_sha256)],
      ["Training run", v.run], ["Dataset", v.dataset ? `${v.dataset}${v.dataset_sha256 ? ` (content ${v.dataset_sha256.slice(0, 12)}\u2026)` : ""}` : null],
      ["Parent", v.parent ? (refHref(v.parent) ? link(refHref(v.parent), v.parent) : v.parent) : null],
      ["Aliases", lineage.aliases.map((a) => badge("@" + a))], ["Description", v.description],
    ]);
    drawLineage($("lineage"), v, lineage);
    fill("files", table(`${v.files.length} file${v.files.length === 1 ? "" : "s"}, each checked against its sha256 when it is read`,
      [["Path"], ["Size", "num"], ["sha256", "sha"]], v.files.map((f) => [h("code", {}, f.path), bytes(f.size), f.sha256]), "No files."));
    const metrics = Object.entries(v.metrics);
    fill("metrics", table(null, [["Metric"], ["Value", "num"]], metrics.map(([k, x]) => [k, number(x)]), "No metrics were recorded for this version."));
    await Promise.all([showReports(path, v), showLossCurve(path, v)]);
  };

  async function fileOf(path, entry) {
    return call(`${path}/files/${entry.path.split("/").map(encodeURIComponent).join("/")}`);
  }

  async function showReports(path, v) {
    const reports = v.files.filter((f) => /(^|\/)(compression|report|merge)[^/]*\.json$/.test(f.path) && f.size < 1 << 20);
    if (!reports.length) {
      fill("reports", h("p", { class: "empty" }, "No compression or merge report: lmaas compress did not make this version."));
      return;
    }
    const parts = await Promise.all(reports.map(async (f) => {
      try {
        const parsed = JSON.parse(await (await fileOf(path, f)).text());
        const flat = Object.entries(parsed).filter(([, x]) => x === null || typeof x !== "object");
        return h("div", { class: "card report-card" }, h("h3", {}, h("code", {}, f.path)),
          flat.length ? table(null, [["Field"], ["Value"]], flat.map(([k, x]) => [k, typeof x === "number" ? number(x) : String(x)])) : null,
          h("details", {}, h("summary", {}, "The whole file"), h("pre", { class: "report" }, JSON.stringify(parsed, null, 1))));
      } catch (err) {
        return h("p", { class: "error" }, `${f.path}: ${describe(err)}`);
      }
    }));
    fill("reports", parts);
  }

  async function showLossCurve(path, v) {
    const png = v.files.find((f) => /(^|\/)loss[^/]*\.png$/.test(f.path));
    if (!png) {
      fill("loss", h("p", { class: "empty" }, v.run
        ? `This version's files hold no loss.png; run ${v.run} keeps its curve in the artifact store (runs/${v.run}/loss.png).`
        : "No training run is recorded for this version."));
      return;
    }
    const blob = await (await fileOf(path, png)).blob();
    const img = h("img", { class: "loss", id: "loss-curve", src: URL.createObjectURL(blob),
      alt: `Training and validation loss against step${v.run ? ` of run ${v.run}` : ""}` });
    fill("loss", h("figure", {}, img, h("figcaption", {}, png.path)));
  }

  /** The lineage as a picture: dataset and parent -> run -> this version -> children -> deployments. */
  function drawLineage(figure, v, lineage) {
    const columns = [[], [], [], [], []];
    if (lineage.dataset) columns[0].push({ kind: "dataset", label: lineage.dataset, id: "dataset" });
    if (lineage.parent) columns[0].push({ kind: "parent", label: lineage.parent, id: "parent", href: refHref(lineage.parent) });
    if (lineage.run) columns[1].push({ kind: "run", label: lineage.run, id: "run" });
    columns[2].push({ kind: "current", label: lineage.ref, id: "version",
      note: lineage.aliases.length ? lineage.aliases.map((a) => "@" + a).join(" ") : null });
    lineage.children.forEach((c, i) => columns[3].push({ kind: "child", label: c, id: `child-${i}`, href: refHref(c) }));
    lineage.deployments.forEach((d, i) => columns[4].push({ kind: "deployment", label: d, id: `deployment-${i}`, href: `${ROOT}/deployments` }));
    const used = columns.filter((c) => c.length);
    const W = 176;
    const H = 50;
    const rows = Math.max(...used.map((c) => c.length));
    // left to right where it fits; top to bottom on a narrow screen (a phone), so the labels stay readable
    const wide = used.length * W + (used.length - 1) * 56 + 20;
    const across = figure.clientWidth === 0 || figure.clientWidth >= wide;
    const GAP_X = across ? 56 : 16;
    const GAP_Y = across ? 18 : 34;
    const levels = used.length;
    const width = across ? wide : rows * W + (rows - 1) * GAP_X + 20;
    const height = across ? rows * H + (rows - 1) * GAP_Y + 20 : levels * H + (levels - 1) * GAP_Y + 20;
    const at = {};
    used.forEach((column, ci) => {
      if (across) {
        const top = (height - (column.length * H + (column.length - 1) * GAP_Y)) / 2;
        column.forEach((node, ri) => { at[node.id] = { x: 10 + ci * (W + GAP_X), y: top + ri * (H + GAP_Y), node }; });
      } else {
        const left = (width - (column.length * W + (column.length - 1) * GAP_X)) / 2;
        column.forEach((node, ri) => { at[node.id] = { x: left + ri * (W + GAP_X), y: 10 + ci * (H + GAP_Y), node }; });
      }
    });
    const edges = [];
    const sources = columns[0].map((n) => n.id);
    if (lineage.run) {
      sources.forEach((s) => edges.push([s, "run"]));
      edges.push(["run", "version"]);
    } else {
      sources.forEach((s) => edges.push([s, "version"]));
    }
    columns[3].forEach((n) => edges.push(["version", n.id]));
    columns[4].forEach((n) => edges.push(["version", n.id]));
    const kinds = { dataset: "dataset", parent: "parent version", run: "training run", current: "this version", child: "derived version", deployment: "deployment" };
    const words = edges.map(([a, b]) => `${kinds[at[a].node.kind]} ${at[a].node.label} \u2192 ${kinds[at[b].node.kind]} ${at[b].node.label}`);
    const picture = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-labelledby": "lineage-svg-title lineage-svg-desc", id: "lineage-svg" },
      svg("title", { id: "lineage-svg-title" }, `Lineage of ${lineage.ref}`),
      svg("desc", { id: "lineage-svg-desc" }, words.length ? words.join("; ") : "No recorded dataset, run, parent, children or deployments."),
      svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8c959f" }))),
      edges.map(([a, b]) => {
        const p = at[a];
        const q = at[b];
        if (!across) {
          const [x1, y1, x2, y2] = [p.x + W / 2, p.y + H, q.x + W / 2, q.y - 2];
          const mid = (y1 + y2) / 2;
          return svg("path", { class: "edge", d: `M ${x1} ${y1} C ${x1} ${mid}, ${x2} ${mid}, ${x2} ${y2}`, "marker-end": "url(#arrow)" });
        }
        const [x1, y1, x2, y2] = [p.x + W, p.y + H / 2, q.x - 2, q.y + H / 2];
        const mid = (x1 + x2) / 2;
        return svg("path", { class: "edge", d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)" });
      }),
      Object.values(at).map(({ x, y, node }) => {
        const label = node.label.length > 24 ? node.label.slice(0, 23) + "\u2026" : node.label;
        const group = svg("g", { class: `node ${node.kind === "current" ? "version current" : node.kind}`, "data-node": node.kind, "data-label": node.label },
          svg("title", {}, `${kinds[node.kind]}: ${node.label}`),
          svg("rect", { x, y, width: W, height: H, rx: 6 }),
          svg("text", { class: "kind", x: x + 10, y: y + 15 }, kinds[node.kind]),
          svg("text", { x: x + 10, y: y + 32 }, label),
          node.note ? svg("text", { class: "kind", x: x + 10, y: y + 45 }, node.note) : null);
        return node.href ? svg("a", { href: node.href, "aria-label": `${kinds[node.kind]} ${node.label}` }, group) : group;
      }));
    fill(figure, picture, h("figcaption", {}, "Dataset and parent \u2192 training run \u2192 this version \u2192 versions derived from it \u2192 deployments serving it."));
  }

  // a deployment's recent requests as the gateway counted them (`traffic` of GET /api/v1/deployments)
  function trafficText(t) {
    if (!t) return "not measured by this gateway";
    const minutes = Math.round(t.window_s / 60);
    if (!t.requests) return `no requests in the last ${minutes} min`;
    return `${number(t.requests_per_s)} req/s (${t.requests} in the last ${minutes} min), ` +
      `TTFT p50 ${t.ttft_p50_ms === null ? "-" : Math.round(t.ttft_p50_ms) + " ms"}, ` +
      `${number(100 * t.error_rate)} % errors`;
  }

  pages.deployments = function () {
    let last = "";
    const act = async (name, patch, what) => {
      clearError();
      try {
        const out = await api(`/api/v1/deployments/${encodeURIComponent(name)}`, { method: "PATCH", json: patch });
        say(`${what} of ${name} requested: change ${out.change.id} is ${out.change.status}. This page shows when it is done.`);
        last = "";
      } catch (err) {
        showError(err);
      }
    };
    const card = (d) => {
      const c = d.canary;
      const split = c ? h("div", { class: "split", role: "img", "aria-label": `stable ${100 - c.weight}%, canary ${c.weight}%` },
        h("span", { class: "stable" }), h("span", { class: "canary" })) : null;
      if (split) {
        split.children[0].style.flexBasis = `${100 - c.weight}%`;
        split.children[1].style.flexBasis = `${c.weight}%`;
      }
      const minId = `min-${d.name}`;
      const maxId = `max-${d.name}`;
      const scale = h("form", { class: "row scale", "data-name": d.name,
        onsubmit: (event) => {
          event.preventDefault();
          act(d.name, { min_replicas: Number($(minId).value), max_replicas: Number($(maxId).value) }, "Scaling");
        } },
        h("label", { for: minId }, "Min replicas"), h("input", { id: minId, type: "number", min: 0, max: 64, value: d.min_replicas, required: true }),
        h("label", { for: maxId }, "Max replicas"), h("input", { id: maxId, type: "number", min: 1, max: 64, value: d.max_replicas, required: true }),
        h("button", { type: "submit", "aria-label": `Scale ${d.name}` }, "Scale"));
      const change = d.change;
      return h("article", { class: "card deployment", "data-name": d.name, "aria-labelledby": `dep-${d.name}` },
        h("h2", { id: `dep-${d.name}` }, d.name, " ", stateBadge(d.status)),
        h("dl", { class: "summary" },
          h("dt", {}, "Reference"), h("dd", { class: "ref" }, d.ref),
          h("dt", {}, "Serving now"), h("dd", {}, refHref(d.serving) ? link(refHref(d.serving), d.serving) : d.serving),
          h("dt", {}, "Replicas"), h("dd", {}, `${d.running} running, autoscaling ${d.min_replicas} to ${d.max_replicas}`),
          h("dt", {}, "Engine"), h("dd", {}, d.engine + (d.multiplexed ? " (multiplexed)" : "")),
          d.tenant ? [h("dt", {}, "Tenant"), h("dd", {}, d.tenant)] : null,
          h("dt", {}, "Traffic"), h("dd", { class: "traffic" }, trafficText(d.traffic)),
          h("dt", {}, "Canary"), h("dd", { class: "canary-info" }, c
            ? [h("span", {}, `${c.ref} takes ${c.weight}% `), stateBadge(c.state || "configured"),
              c.reason ? h("span", { class: "reason" }, ` \u2014 ${c.state === "rolled_back" ? "rolled back because " : ""}${c.reason}`) : null, split]
            : "none"),
          change ? [h("dt", {}, "Last change"), h("dd", { class: "change" }, `${change.op} `, stateBadge(change.status),
            ` by ${change.actor || "?"} at ${when(change.requested_at)}`, change.error ? h("span", { class: "bad" }, ` \u2014 ${change.error}`) : null)] : null),
        h("div", { class: "actions" },
          c ? h("button", { type: "button", class: "primary", "aria-label": `Promote canary of ${d.name}`,
            onclick: () => act(d.name, { ref: c.ref, canary: null }, "Promotion") }, "Promote canary") : null,
          c ? h("button", { type: "button", class: "danger", "aria-label": `Roll back canary of ${d.name}`,
            onclick: () => act(d.name, { canary: null }, "Rollback") }, "Roll back canary") : null,
          scale));
    };
    every(3000, async () => {
      const listing = await api("/api/v1/deployments");
      const text = JSON.stringify(listing);
      const typing = document.activeElement && document.activeElement.tagName === "INPUT";
      if (text === last || typing) return;
      last = text;
      fill("deployments", listing.data.length ? listing.data.map(card) : h("p", { class: "empty" }, "No deployments visible to this key."));
      fill("changes", table(null, [["Requested"], ["Deployment"], ["Change"], ["By"], ["Status"], ["Error"]],
        listing.changes.slice(-10).reverse().map((c) => [when(c.requested_at), c.name || "-", c.op, c.actor || "-", stateBadge(c.status), c.error || ""]),
        "No recent changes."));
    });
  };

  pages.jobs = function () {
    const state = $("job-state");
    const FINISHED = ["succeeded", "failed", "cancelled"];
    const load = async () => {
      const query = state.value ? `?limit=200&state=${encodeURIComponent(state.value)}` : "?limit=200";
      const jobs = (await api("/api/v1/jobs" + query)).data;
      fill("jobs", table(null, [["Job", "num"], ["Kind"], ["Tenant"], ["Priority"], ["State"], ["Created"], ["Message"], ["Actions"]],
        jobs.map((j) => [String(j.id), j.kind, j.tenant, j.priority, stateBadge(j.state), when(j.created_at), j.message || "",
          h("span", { class: "row" },
            h("button", { type: "button", "aria-label": `Logs of job ${j.id}`, onclick: () => logs(j.id) }, "Logs"),
            h("button", { type: "button", class: "danger", "aria-label": `Cancel job ${j.id}`, disabled: FINISHED.includes(j.state),
              onclick: () => cancel(j.id) }, "Cancel"))]),
        state.value ? `No ${state.value} jobs.` : "No jobs visible to this key."));
    };
    const cancel = async (id) => {
      clearError();
      try {
        const job = await api(`/api/v1/jobs/${id}/cancel`, { method: "POST" });
        say(`Job ${id} is ${job.state}: ${job.message}`);
        await load();
      } catch (err) {
        showError(err);
      }
    };
    const logs = async (id) => {
      clearError();
      $("logs-section").hidden = false;
      $("logs-title").textContent = `Logs of job ${id} (last 200 lines)`;
      try {
        const text = await (await call(`/api/v1/jobs/${id}/logs`)).text();
        $("job-logs").textContent = text.split("\n").slice(-200).join("\n") || "(no output yet)";
      } catch (err) {
        $("job-logs").textContent = describe(err);
      }
    };
    $("jobs-filter").addEventListener("submit", (event) => { event.preventDefault(); load().catch(showError); });
    state.addEventListener("change", () => load().catch(showError));
    every(5000, load);
  };

  pages.playground = async function () {
    const select = $("pg-model");
    const transcript = $("transcript");
    const messages = [];
    let controller = null;
    try {
      const models = (await api("/v1/models")).data;
      fill(select, models.map((m) => h("option", { value: m.id }, m.id)));
      if (!models.length) showError("No served model is visible to this key.");
    } catch (err) {
      showError(err);
    }
    const bubble = (role, who) => {
      const text = h("div", { class: "text" });
      const meta = h("div", { class: "meta" });
      transcript.append(h("article", { class: `message ${role}` }, h("p", { class: "who" }, who), text, meta));
      return { text, meta };
    };
    const tokenSpan = (content, logprobs) => {
      if (!logprobs || !logprobs.length) return document.createTextNode(content);
      const parts = logprobs.map((lp) => {
        const p = Math.exp(lp.logprob);
        const top = (lp.top_logprobs || []).filter((t) => t.token !== lp.token).slice(0, 3)
          .map((t) => `${JSON.stringify(t.token)} ${t.logprob.toFixed(3)}`);
        return `${JSON.stringify(lp.token)}: logprob ${lp.logprob.toFixed(3)} (p ${(100 * p).toFixed(1)}%)${top.length ? `; also ${top.join(", ")}` : ""}`;
      });
      const low = logprobs.some((lp) => lp.logprob < Math.log(0.1));
      return h("span", { class: `tok${low ? " p-low" : ""}`, title: parts.join("\n"), tabindex: 0, "data-logprob": logprobs[0].logprob }, content);
    };
    const clear = () => { messages.length = 0; transcript.replaceChildren(); };
    $("pg-clear").addEventListener("click", clear);
    $("pg-stop").addEventListener("click", () => controller && controller.abort());
    $("chat-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      clearError();
      const content = $("pg-message").value.trim();
      if (!content || !select.value) return;
      messages.push({ role: "user", content });
      bubble("user", "You").text.textContent = content;
      $("pg-message").value = "";
      const answer = bubble("assistant", select.value);
      controller = new AbortController();
      $("pg-send").disabled = true;
      $("pg-stop").disabled = false;
      let text = "";
      let id = null;
      let finish = null;
      let usage = null;
      try {
        const response = await call("/v1/chat/completions", {
          method: "POST", signal: controller.signal,
          json: { model: select.value, messages, stream: true, logprobs: true, top_logprobs: 3,
            temperature: Number($("pg-temperature").value), max_tokens: Number($("pg-max-tokens").value),
            stream_options: { include_usage: true } },
        });
        const version = response.headers.get("X-Lmaas-Model-Version");
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let done = false;
        while (!done) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += decoder.decode(chunk.value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const event_ = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            for (const line of event_.split("\n")) {
              if (!line.startsWith("data:")) continue;
              const data = line.slice(5).trim();
              if (data === "[DONE]") { done = true; break; }
              const parsed = JSON.parse(data);
              if (parsed.error) throw new ApiError(500, parsed.error.message || "the stream failed");
              id = parsed.id || id;
              usage = parsed.usage || usage;
              for (const choice of parsed.choices || []) {
                const piece = (choice.delta && choice.delta.content) || "";
                if (piece) {
                  text += piece;
                  answer.text.append(tokenSpan(piece, choice.logprobs && choice.logprobs.content));
                }
                finish = choice.finish_reason || finish;
              }
            }
          }
        }
        messages.push({ role: "assistant", content: text });
        answer.meta.append(h("span", {}, [version ? `answered by ${version}` : null, finish ? `finish: ${finish}` : null,
          usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : null].filter(Boolean).join(" \u00b7 ")));
        if (id) answer.meta.append(feedbackButtons(id));
      } catch (err) {
        if (err.name === "AbortError") {
          answer.meta.append(h("span", {}, "stopped"));
          messages.push({ role: "assistant", content: text });
        } else {
          messages.pop();
          answer.meta.append(h("span", { class: "bad" }, describe(err)));
          showError(err);
        }
      } finally {
        controller = null;
        $("pg-send").disabled = false;
        $("pg-stop").disabled = true;
      }
    });
  };

  function feedbackButtons(responseId) {
    const out = h("span", { class: "feedback" });
    const rate = async (rating) => {
      try {
        await api("/api/v1/feedback", { method: "POST", json: { response_id: responseId, rating } });
        out.replaceChildren(`thanks: rated ${rating === 5 ? "good" : "bad"}`);
      } catch (err) {
        out.replaceChildren(describe(err));
      }
    };
    out.append(
      h("button", { type: "button", onclick: () => rate(5) }, "Good answer"),
      h("button", { type: "button", onclick: () => rate(1) }, "Bad answer"));
    return out;
  }

  pages.usage = function () {
    const loadUsage = async () => {
      const days = Number($("usage-days").value);
      const group = $("usage-group").value;
      const today = new Date();
      const dates = [];
      for (let i = days - 1; i >= 0; i -= 1) dates.push(new Date(today.getTime() - i * 86400000).toISOString().slice(0, 10));
      // one call per UTC day: the usage route sums over its `since`..`until`
      const [perDay, whole] = await Promise.all([
        Promise.all(dates.map((d) => api(`/api/v1/usage?since=${d}&until=${d}`))),
        api(`/api/v1/usage?since=${dates[0]}&until=${dates[dates.length - 1]}`),
      ]);
      const series = {};
      perDay.forEach((day, i) => {
        for (const row of day.data) {
          const name = row[group] || "-";
          (series[name] = series[name] || dates.map(() => 0))[i] += row.total_tokens;
        }
      });
      drawChart($("usage-chart"), dates, series, `Tokens per UTC day by ${group === "key_id" ? "API key" : group}, the last ${days} days`);
      const totals = {};
      for (const row of whole.data) {
        const name = row[group] || "-";
        const t = (totals[name] = totals[name] || { requests: 0, prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
        for (const f of Object.keys(t)) t[f] += row[f];
      }
      fill("usage-table", table(`Totals over the last ${days} days`, [[group === "key_id" ? "API key" : group], ["Requests", "num"], ["Prompt tokens", "num"],
        ["Completion tokens", "num"], ["Total tokens", "num"]],
        Object.entries(totals).map(([name, t]) => [name, number(t.requests), number(t.prompt_tokens), number(t.completion_tokens), number(t.total_tokens)]),
        "No usage in this period."));
    };
    const loadFeedback = async () => {
      const rows = (await api("/api/v1/feedback")).data;
      fill("feedback", table(null, [["Model"], ["Version"], ["Ratings", "num"], ["Mean rating (1-5)", "num"]],
        rows.map((r) => [r.model, r.version ? (refHref(r.version) ? link(refHref(r.version), r.version) : r.version) : "-", number(r.count), r.mean_rating.toFixed(2)]),
        "No feedback yet."));
    };
    const loadAudit = async () => {
      const params = new URLSearchParams({ limit: "100" });
      if ($("audit-action").value.trim()) params.set("action", $("audit-action").value.trim());
      if ($("audit-tenant").value.trim()) params.set("tenant", $("audit-tenant").value.trim());
      try {
        const page = await api("/api/v1/audit?" + params);
        fill("audit", table(page.has_more ? "the newest 100 events" : null, [["When"], ["Actor"], ["Tenant"], ["Action"], ["Target"], ["Outcome"], ["Detail"]],
          page.data.map((e) => [when(e.created_at), e.actor, e.tenant || "-", h("code", {}, e.action), e.target,
            stateBadge(e.outcome), h("code", { class: "detail" }, JSON.stringify(e.detail).slice(0, 160))]),
          "No events match."));
      } catch (err) {
        fill("audit", h("p", { class: "error" }, describe(err)));
      }
    };
    const guard = (fn, id) => fn().catch((err) => fill(id, h("p", { class: "error" }, describe(err))));
    $("usage-form").addEventListener("submit", (event) => { event.preventDefault(); guard(loadUsage, "usage-table"); });
    $("audit-form").addEventListener("submit", (event) => { event.preventDefault(); loadAudit(); });
    guard(loadUsage, "usage-table");
    guard(loadFeedback, "feedback");
    loadAudit();
  };

  const COLORS = ["#0a58ca", "#1a7f37", "#cf222e", "#9a6700", "#8250df", "#1b7c83", "#bc4c00", "#57606a"];

  /** A line per series over `dates`, with axes and a legend. */
  function drawChart(figure, dates, series, title) {
    const names = Object.keys(series).sort((a, b) => series[b].reduce((x, y) => x + y, 0) - series[a].reduce((x, y) => x + y, 0)).slice(0, COLORS.length);
    const width = 720;
    const height = 260;
    const left = 60;
    const right = 30;
    const top = 12;
    const bottom = 34;
    const max = Math.max(1, ...names.flatMap((n) => series[n]));
    const x = (i) => left + (dates.length === 1 ? 0 : (i * (width - left - right)) / (dates.length - 1));
    const y = (v) => top + (height - top - bottom) * (1 - v / max);
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => Math.round(max * f));
    const words = names.map((n) => `${n}: ${series[n].reduce((a, b) => a + b, 0)} tokens`).join("; ");
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-labelledby": "chart-title chart-desc", id: "usage-svg" },
      svg("title", { id: "chart-title" }, title),
      svg("desc", { id: "chart-desc" }, names.length ? words : "No tokens in this period."),
      ticks.map((t) => [svg("line", { class: "grid", x1: left, x2: width - right, y1: y(t), y2: y(t) }),
        svg("text", { class: "label", x: left - 6, y: y(t) + 4, "text-anchor": "end" }, number(t))]),
      svg("line", { class: "axis", x1: left, x2: width - right, y1: y(0), y2: y(0) }),
      dates.map((d, i) => (i % Math.ceil(dates.length / 7) === 0 || i === dates.length - 1)
        ? svg("text", { class: "label", x: x(i), y: height - bottom + 16, "text-anchor": "middle" }, d.slice(5)) : null),
      names.map((n, k) => svg("g", { "data-series": n },
        svg("polyline", { class: "series", stroke: COLORS[k], points: series[n].map((v, i) => `${x(i)},${y(v)}`).join(" ") }),
        series[n].map((v, i) => svg("circle", { cx: x(i), cy: y(v), r: 3, fill: COLORS[k] }, svg("title", {}, `${n}, ${dates[i]}: ${v} tokens`))))));
    const legend = h("ul", { class: "row legend" }, names.map((n, k) => {
      const swatch = h("span", { class: "badge" }, "\u25A0");
      swatch.style.color = COLORS[k];
      return h("li", {}, swatch, " ", n);
    }));
    fill(figure, chart, names.length ? legend : h("figcaption", {}, "No tokens in this period."));
  }

  // ---- start ---------------------------------------------------------------------------------

  function start() {
    if (PAGE !== "login") {
      const key = storedKey();
      if (!key) return logout(null);
      const id = /^lmaas_([0-9a-f]{12})_/.exec(key); // a generated key starts with its id, which is no secret
      $("key-id").textContent = id ? `key ${id[1]}` : "key entered";
      $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.assign(ROOT + "/login"); });
    }
    const run = pages[PAGE];
    if (!run) return;
    Promise.resolve()
      .then(run)
      .catch(showError);
  }

  start();
})();
