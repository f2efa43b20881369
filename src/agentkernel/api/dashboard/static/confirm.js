// Forms with data-confirm ask before they are sent (removing a sandbox).
"use strict";
document.addEventListener("submit", (event) => {
  const question = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (question && !window.confirm(question)) event.preventDefault();
});
