// credproxy status page: live update and in-place "Refresh now". The page
// works without this file (forms post and redirect back); with it, the page
// re-reads itself every few seconds and swaps in the new #live section, so
// every value still comes from the server's escaped rendering.
"use strict";

const UPDATE_EVERY_MS = 5000;

async function update() {
  // ".": this page without its query, wherever it is mounted.
  const response = await fetch(".", { headers: { Accept: "text/html" }, cache: "no-store" });
  if (!response.ok) {
    return;
  }
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.getElementById("live");
  const live = document.getElementById("live");
  if (fresh && live) {
    live.replaceWith(document.adoptNode(fresh));
  }
}

async function refresh(form) {
  const name = form.closest("tr").querySelector(".name").textContent;
  const notice = document.getElementById("notice");
  form.querySelector("button").disabled = true;
  notice.textContent = `Refreshing ${name}…`;
  try {
    const response = await fetch(form.action, { method: "POST", headers: { Accept: "application/json" } });
    const answer = await response.json();
    notice.textContent = response.ok
      ? `Refreshed ${name}.`
      : `Refreshing ${name} failed: ${answer.message}`;
  } catch (error) {
    notice.textContent = `Refreshing ${name} failed: ${error}`;
  }
  await update();
}

document.addEventListener("submit", (event) => {
  const form = event.target.closest("form.refresh");
  if (form) {
    event.preventDefault();
    refresh(form);
  }
});

setInterval(() => update().catch(() => {}), UPDATE_EVERY_MS);
