// Live job states over server-sent events (GET /events: /api/events for the session cookie). On the jobs page a changed job's row is updated in
// place (status, deliveries, best answer, verdict, score); on a job's page a change of status reloads it. No build
// step; the session cookie authenticates the stream.
window.arbor = {
  verdict(best) {
    if (!best) return "";
    return best.verified === true ? "yes" : best.verified === false ? "no" : "–";
  },
  updateRow(row, job) {
    const cells = row.querySelectorAll("td");
    cells[3].textContent = job.status;
    cells[3].className = "status " + job.status;
    cells[4].textContent = job.attempts;
    if (job.best) {
      cells[6].replaceChildren(Object.assign(document.createElement("code"), { textContent: job.best.completion }));
      cells[7].textContent = arbor.verdict(job.best);
      cells[8].textContent = job.best.score == null ? "" : job.best.score.toFixed(3);
    }
  },
  followJobs(ids, reloadOnChange) {
    if (!window.EventSource) return;
    const live = document.getElementById("live");
    const query = (ids || []).map((id) => "job=" + encodeURIComponent(id)).join("&");
    const source = new EventSource("/events" + (query ? "?" + query : ""));
    source.addEventListener("open", () => { if (live) live.textContent = "live"; });
    source.addEventListener("job", (event) => {
      const job = JSON.parse(event.data);
      const row = document.querySelector(`tr[data-job="${job.job_id}"]`);
      if (row) arbor.updateRow(row, job);
      const status = document.getElementById("status");
      if (reloadOnChange && status && status.textContent !== job.status) location.reload();
    });
    source.addEventListener("end", () => { source.close(); if (reloadOnChange) location.reload(); });
    source.addEventListener("error", () => { if (live) live.textContent = "live updates paused"; });
  },
};
