// The connector's web console: health, fleet, jobs and runs, polled from the API.
// The token is kept in sessionStorage (this tab only) and sent as a header,
// never in a URL. Every value from the API is shown as text, never as markup.
"use strict";

const TOKEN_KEY = "connector-api-token";
const POLL_MS = 2000;
let timer = null;

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class Unauthorized extends Error {}

async function api(method, path) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: "Bearer " + token(), Accept: "application/json" },
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401) throw new Unauthorized("the token was refused");
  const body = await response.json().catch(() => ({}));
  return { status: response.status, ok: response.ok, body };
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer) clearInterval(timer);
  timer = null;
  $("console-view").hidden = true;
  $("logout").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

function showConsole() {
  $("login-view").hidden = true;
  $("console-view").hidden = false;
  $("logout").hidden = false;
  refresh();
  if (!timer) timer = setInterval(refresh, POLL_MS);
}

function renderHealth(ready) {
  const badge = $("ready");
  badge.textContent = ready.ready ? "READY" : "NOT READY";
  badge.className = "badge " + (ready.ready ? "ok" : "bad");
  const list = $("checks");
  list.replaceChildren();
  for (const check of ready.checks || []) {
    const li = document.createElement("li");
    li.className = check.ok ? "ok" : "bad";
    li.dataset.check = check.name;
    li.textContent = `${check.name}: ${check.detail}`;
    list.appendChild(li);
  }
}

function renderFleet(fleet) {
  const body = document.querySelector("#fleet tbody");
  const summary = $("fleet-summary");
  const message = $("fleet-message");
  body.replaceChildren();
  if (!fleet.ok) {
    // 404: no [fleet] section, this connector works alone
    summary.textContent = fleet.status === 404 ? "NOT IN A FLEET" : "UNKNOWN";
    summary.className = "badge";
    message.textContent = fleet.body.error || `the fleet could not be read (${fleet.status})`;
    $("fleet").hidden = true;
    return;
  }
  const doc = fleet.body;
  summary.textContent = `${doc.alive} of ${doc.members.length} alive`;
  summary.className = "badge " + (doc.alive > 0 ? "ok" : "bad");
  message.textContent =
    `this connector: ${doc.this_member}; leader: ` +
    (doc.leader || "none (no member holds the scheduler's lease)");
  $("fleet").hidden = false;
  for (const member of doc.members) {
    const row = document.createElement("tr");
    row.dataset.member = member.id;
    cell(row, member.id, "id");
    cell(row, member.host);
    cell(row, member.version);
    cell(row, member.capabilities.join(", "));
    cell(row, member.state, "state-" + member.state).dataset.field = "state";
    cell(row, `${member.heartbeat_age.toFixed(1)} s ago`);
    cell(row, member.leader ? "yes" : "").dataset.field = "leader";
    const running = member.running.map((w) => `${w.run_id} (${w.stage})`).join(", ");
    cell(row, running || "-").dataset.field = "running";
    body.appendChild(row);
  }
}

function actionButton(job, action, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.dataset.action = action;
  button.dataset.job = job.id;
  button.addEventListener("click", () => act(job.id, action));
  return button;
}

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  $("no-jobs").hidden = jobs.length > 0;
  for (const job of jobs) {
    const row = document.createElement("tr");
    row.dataset.job = job.id;
    cell(row, job.id, "id");
    cell(row, job.vm_name);
    const state = cell(row, job.state + (job.paused ? " (paused)" : ""), "state-" + job.state);
    state.dataset.field = "state";
    if (job.paused) state.classList.add("paused");
    cell(row, job.run_once ? "once" : `${job.frequency_hours} h`);
    cell(row, job.next_run || "-");
    cell(row, `${job.on_demand.left} of ${job.on_demand.quota}`);
    cell(row, job.problem || job.message);
    const actions = cell(row, "");
    if (job.state !== "DELETING" && job.state !== "DELETED") {
      actions.appendChild(actionButton(job, "start", "Start"));
      if (job.paused || job.state === "PAUSED_ON_FAILURE") {
        actions.appendChild(actionButton(job, "resume", "Resume"));
      } else {
        actions.appendChild(actionButton(job, "pause", "Pause"));
      }
    }
    body.appendChild(row);
  }
}

function renderRuns(runs, vmByJob) {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  for (const run of runs.slice().reverse()) {
    const row = document.createElement("tr");
    row.dataset.run = run.id;
    cell(row, run.id, "id");
    cell(row, run.job_id || "", "id");
    cell(row, vmByJob.get(run.job_id) || "");
    cell(row, run.type);
    cell(row, run.state, "state-" + run.state).dataset.field = "state";
    cell(row, run.stage);
    const progress = cell(row, "");
    const p = run.progress;
    if (p && p.total > 0) {
      const bar = document.createElement("progress");
      bar.max = p.total;
      bar.value = p.done;
      progress.appendChild(bar);
      progress.append(` ${Math.floor((100 * p.done) / p.total)}% ${p.detail || ""}`);
    } else if (p && p.detail) {
      progress.textContent = p.detail;
    }
    cell(row, run.started_at);
    cell(row, run.finished_at || "");
    cell(row, run.error || "", "error");
    body.appendChild(row);
  }
}

async function refresh() {
  try {
    const [health, ready, jobs, runs, fleet] = await Promise.all([
      api("GET", "/healthz"),
      api("GET", "/readyz"),
      api("GET", "/v1/jobs"),
      api("GET", "/v1/runs?last=50"),
      api("GET", "/v1/fleet"),
    ]);
    renderHealth(ready.body);
    renderFleet(fleet);
    if (jobs.ok) renderJobs(jobs.body);
    const vmByJob = new Map((jobs.ok ? jobs.body : []).map((j) => [j.id, j.vm_name]));
    if (runs.ok) renderRuns(runs.body, vmByJob);
    $("version").textContent = "version " + health.body.version;
    $("updated").textContent = "updated " + new Date().toISOString();
  } catch (error) {
    if (error instanceof Unauthorized) showLogin("The token was refused: log in again.");
    else $("updated").textContent = "the connector does not answer: " + error.message;
  }
}

async function act(jobId, action) {
  const message = $("action-message");
  try {
    const result = await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/${action}`);
    message.className = result.ok ? "" : "error";
    message.textContent = result.ok
      ? `${action}: done for job ${jobId}`
      : `${action} refused: ${result.body.error || result.status}`;
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin("The token was refused: log in again.");
    message.className = "error";
    message.textContent = `${action} failed: ${error.message}`;
  }
  refresh();
}

async function login(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  try {
    const health = await api("GET", "/healthz");
    $("version").textContent = "version " + health.body.version;
    showConsole();
  } catch (error) {
    showLogin(error instanceof Unauthorized ? "The token was refused." : error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => showLogin("Logged out."));
  if (token()) showConsole();
  else showLogin("");
});
