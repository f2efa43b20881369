// A sandbox's command and network tables, kept current from its Server-Sent Events.
"use strict";
(() => {
  const commands = document.getElementById("commands");
  const network = document.getElementById("network");
  if (!commands || !network || !window.EventSource) return;

  const row = (body, cells, className) => {
    const tr = body.insertRow();
    if (className) tr.className = className;
    for (const [text, code] of cells) {
      const td = tr.insertCell();
      if (code) {
        const c = document.createElement("code");
        c.textContent = text;
        td.append(c);
      } else {
        td.textContent = text;
      }
    }
  };
  const replace = (table, fill) => {
    const body = document.createElement("tbody");
    fill(body);
    table.tBodies[0].replaceWith(body);
  };
  const ended = (e) => {
    let how = e.error || (e.signal ? `signal ${e.signal}` : String(e.exit_code ?? ""));
    if (e.timed_out) how += " (timed out)";
    return how;
  };

  const source = new EventSource(commands.dataset.events);
  source.addEventListener("commands", (message) => {
    replace(commands, (body) => {
      for (const e of JSON.parse(message.data)) {
        const seconds = e.duration_s === null || e.duration_s === undefined ? "" : String(e.duration_s);
        row(body, [[e.ts], [(e.argv || []).join(" "), true], [ended(e)], [seconds]]);
      }
    });
  });
  source.addEventListener("network", (message) => {
    replace(network, (body) => {
      for (const e of JSON.parse(message.data)) {
        const decision = e.allowed ? "allowed" : "refused";
        row(body, [[e.ts], [decision], [e.host || e.raw_host || ""], [String(e.port || "")], [e.reason]], decision);
      }
    });
  });
})();
