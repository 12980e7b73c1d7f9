// Live job states over server-sent events (GET /api/events): a changed job reloads the page once its state differs
// from what the page shows. No build step; the session cookie authenticates the stream.
window.arbor = {
  followJobs(ids, reloadOnChange) {
    if (!window.EventSource) return;
    const live = document.getElementById("live");
    const query = (ids || []).map((id) => "job=" + encodeURIComponent(id)).join("&");
    const source = new EventSource("/api/events" + (query ? "?" + query : ""));
    source.addEventListener("open", () => { if (live) live.textContent = "live"; });
    source.addEventListener("job", (event) => {
      const job = JSON.parse(event.data);
      const row = document.querySelector(`tr[data-job="${job.job_id}"] td.status`);
      if (row && row.textContent !== job.status) {
        row.textContent = job.status;
        row.className = "status " + job.status;
      }
      const status = document.getElementById("status");
      if (reloadOnChange && status && status.textContent !== job.status) location.reload();
    });
    source.addEventListener("end", () => { source.close(); if (reloadOnChange) location.reload(); });
    source.addEventListener("error", () => { if (live) live.textContent = "live updates paused"; });
  },
};
