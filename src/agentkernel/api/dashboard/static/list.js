// The sandboxes list, kept current from the server's Server-Sent Events (/ui/events).
"use strict";
(() => {
  const table = document.getElementById("sandboxes");
  if (!table) return;
  const prefix = "/ui";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const live = document.getElementById("live");

  const cell = (row, text, className) => {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  };
  const mib = (bytes) => (bytes / 1048576).toFixed(1) + " MiB";

  const actions = (td, name) => {
    td.className = "actions";
    for (const action of ["start", "stop", "remove"]) {
      const form = document.createElement("form");
      form.method = "post";
      form.action = `${prefix}/sandboxes/${encodeURIComponent(name)}/${action}`;
      form.className = "inline";
      if (action === "remove") form.dataset.confirm = `Remove ${name}?`;
      const token = document.createElement("input");
      token.type = "hidden";
      token.name = "csrf";
      token.value = csrf;
      const button = document.createElement("button");
      button.type = "submit";
      button.textContent = action;
      form.append(token, button);
      td.append(form);
    }
  };

  const render = (sandboxes) => {
    const body = document.createElement("tbody");
    for (const s of sandboxes) {
      const row = body.insertRow();
      row.dataset.name = s.name;
      const link = document.createElement("a");
      link.href = `${prefix}/sandboxes/${encodeURIComponent(s.name)}`;
      link.textContent = s.name;
      row.insertCell().append(link);
      cell(row, s.status, `status-${s.status}`);
      cell(row, s.image);
      cell(row, s.backend);
      cell(row, s.profile);
      cell(row, s.age_s === null ? "" : `${s.age_s} s`);
      cell(row, s.lifetime_left_s === null ? "" : `${s.lifetime_left_s} s`);
      cell(row, Object.entries(s.labels).map(([k, v]) => `${k}=${v}`).join(" "));
      cell(row, String(s.vcpus));
      cell(row, `${s.memory_mb} MiB`);
      cell(row, s.rss_bytes ? mib(s.rss_bytes) : "");
      actions(row.insertCell(), s.name);
    }
    table.tBodies[0].replaceWith(body);
  };

  const events = new EventSource(`${prefix}/events${location.search}`); // the page's filters
  events.addEventListener("sandboxes", (event) => {
    render(JSON.parse(event.data));
    live.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  });
  events.onerror = () => { live.textContent = "Reconnecting…"; };
})();
