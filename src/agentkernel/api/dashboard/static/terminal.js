// A terminal in the page: xterm.js over the sandbox's WebSocket attach (see api/attach.py).
"use strict";
(() => {
  const box = document.getElementById("terminal-box");
  if (!box) return;
  const opener = document.getElementById("terminal-open");
  const status = document.getElementById("terminal-status");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  const open = () => {
    opener.disabled = true;
    const term = new Terminal({ cursorBlink: true, scrollback: 5000 });
    const fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(document.getElementById("terminal"));
    fit.fit();
    window.agentkernelTerminal = term; // for the browser tests, which read its buffer

    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ rows: term.rows, cols: term.cols, csrf });
    const socket = new WebSocket(`${scheme}//${location.host}${box.dataset.url}?${query}`);
    socket.binaryType = "arraybuffer";
    const encoder = new TextEncoder();

    socket.onopen = () => { status.textContent = "connected"; term.focus(); };
    socket.onmessage = (event) => {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      const message = JSON.parse(event.data);
      if (message.type === "exit") {
        const how = message.signal ? `killed by signal ${message.signal}` : `exited with code ${message.exit_code}`;
        status.textContent = how;
        status.dataset.exitCode = String(message.exit_code);
        term.write(`\r\n[${how}]\r\n`);
      } else if (message.type === "error") {
        status.textContent = message.detail;
      }
    };
    socket.onclose = (event) => {
      if (!status.dataset.exitCode) status.textContent = `disconnected (${event.code})`;
      opener.disabled = false;
    };
    term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
    });
    term.onResize(({ rows, cols }) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", rows, cols }));
    });
    window.addEventListener("resize", () => fit.fit());
  };
  opener.addEventListener("click", open);
})();
