// Compensa dashboard: keeps the saga list live from /live (server-sent events
// of the event log). The browser's EventSource resends the id of the last
// message it got (Last-Event-ID, a log position) when it reconnects, so the
// list resumes where it stopped; the counts are refreshed after changes.
"use strict";

(function () {
  const table = document.getElementById("sagas");
  if (!table) return;
  const body = table.tBodies[0];
  const status = document.getElementById("live-status");
  const empty = document.getElementById("empty");
  const counts = document.getElementById("counts");
  const filters = table.dataset;
  const limit = parseInt(filters.size, 10) || 100;
  const FINAL_STATES = new Set(["SUCCEEDED", "COMPENSATED", "FAILED"]);

  const params = new URLSearchParams({ after: filters.after });
  if (filters.state) params.set("state", filters.state);
  if (filters.definition) params.set("definition", filters.definition);

  function time(seconds) {
    return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.(\d{3})\d*Z$/, ".$1Z");
  }

  function cell(row, field) {
    return row.querySelector('[data-field="' + field + '"]');
  }

  function newRow(item) {
    const row = document.createElement("tr");
    row.dataset.sagaId = item.saga_id;
    row.dataset.sequence = "0";
    const link = document.createElement("a");
    link.href = "/sagas/" + encodeURIComponent(item.saga_id);
    link.textContent = item.saga_id;
    const cells = [
      ["mono", link], ["", item.definition], ["", null, "state"], ["", "", "step"], ["num", "", "sequence"],
      ["muted", "", "event"], ["time", time(item.time)], ["time", "", "updated"],
    ];
    for (const [cls, content, field] of cells) {
      const td = document.createElement("td");
      if (cls) td.className = cls;
      if (field === "state") {
        const badge = document.createElement("span");
        badge.dataset.field = "state";
        td.appendChild(badge);
      } else if (field) {
        td.dataset.field = field;
      }
      if (content instanceof Node) td.appendChild(content);
      else if (content) td.textContent = content;
      row.appendChild(td);
    }
    return row;
  }

  function apply(item) {
    let row = body.querySelector('tr[data-saga-id="' + CSS.escape(item.saga_id) + '"]');
    if (!row) {
      // A saga that moved is not stuck; a new one must match the search.
      if (filters.stuck || (filters.search && !item.saga_id.includes(filters.search))) return;
      row = newRow(item);
      body.insertBefore(row, body.firstChild);
      while (body.rows.length > limit) body.deleteRow(body.rows.length - 1);
    } else if (item.sequence <= parseInt(row.dataset.sequence, 10)) {
      return;
    } else if (filters.stuck) {
      row.remove();
      return;
    }
    row.dataset.sequence = String(item.sequence);
    const state = cell(row, "state");
    state.className = "badge state-" + item.state.toLowerCase();
    state.textContent = item.state.toLowerCase();
    // The step in progress, as the server renders it: none once the saga ended.
    if (FINAL_STATES.has(item.state)) cell(row, "step").textContent = "";
    else if (item.step) cell(row, "step").textContent = item.step;
    cell(row, "sequence").textContent = String(item.sequence);
    cell(row, "event").textContent = item.event;
    cell(row, "updated").textContent = time(item.time);
    row.dataset.state = item.state.toLowerCase();
    row.classList.remove("flash");
    void row.offsetWidth;
    row.classList.add("flash");
  }

  let countsDue = null;
  function refreshCounts() {
    if (countsDue || !counts) return;
    countsDue = setTimeout(async function () {
      try {
        const answer = await fetch(counts.dataset.refresh, { credentials: "same-origin" });
        if (answer.ok) counts.innerHTML = await answer.text();
      } finally {
        countsDue = null;
      }
    }, 1000);
  }

  const source = new EventSource("/live?" + params.toString());
  source.onopen = function () {
    status.textContent = "live";
    status.className = "live on";
  };
  source.onerror = function () {
    status.textContent = "reconnecting…";
    status.className = "live off";
  };
  source.onmessage = function (message) {
    for (const item of JSON.parse(message.data)) apply(item);
    empty.classList.toggle("hidden", body.rows.length > 0);
    table.dataset.lastPosition = message.lastEventId;
    refreshCounts();
  };
})();
