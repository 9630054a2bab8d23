// Shared by every page: toasts, the confirmation dialog, and actions posted with
// the session's CSRF token. A form with data-confirm asks first, then posts by fetch.
const AJ = (() => {
  const csrf = document.body.dataset.csrf;
  const $ = (id) => document.getElementById(id);
  const dialog = $("confirm");
  const hooks = { text: null, after: null };
  let toastTimer;

  function toast(text, error) {
    const t = $("toast");
    t.textContent = text; t.className = "show" + (error ? " error" : "");
    clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.className = ""; }, 4000);
  }

  function ask(title, text) {
    return new Promise((resolve) => {
      $("confirm-title").textContent = title; $("confirm-text").textContent = text;
      dialog.returnValue = "";
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  async function post(url, data) {
    const res = await fetch(url, {
      method: "POST", body: data,
      headers: { Accept: "application/json", "X-CSRF-Token": csrf },
    });
    if (res.status === 401) { location.reload(); return { ok: false, message: "Signed out" }; }
    const out = await res.json().catch(() => ({ message: `HTTP ${res.status}` }));
    return { ...out, ok: res.ok };
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!form.dataset.confirm) return;
    ev.preventDefault();
    const button = ev.submitter;
    const text = (hooks.text && hooks.text(form, button)) || form.dataset.confirm;
    // Read the form now: a live page may re-render the row while the dialog is
    // open, and a button taken out of the page no longer belongs to the form.
    const data = new FormData(form, button);
    if (!(await ask(form.dataset.title, text))) return;
    try {
      const out = await post(form.action, data);
      toast(out.message, !out.ok);
      if (hooks.after) await hooks.after(form, out);
    } catch (e) { toast("Request failed: " + e, true); }
  });

  return { $, toast, ask, post, hooks, csrf };
})();
