"""The web view: /runs, /jobs, /jobs/{id}, /jobs/{id}/tree, /policies (jinja2 pages under arbor/web/templates), and
for the pages' scripts and images /events and /runs/{name}/learning_curve.png: /api/events' and the curve's own
handlers, here because the session cookie is never accepted under /api.

Each page is a thin view over the Service the JSON API uses; a refusal becomes an error page or a message on the
page, and a page asked for without the token redirects to /login (arbor/api/auth.py).
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse

from arbor.api import routes_api
from arbor.api.auth import require_login
from arbor.api.pages import page
from arbor.api.service import ApiError, Service, service
from arbor.submission import SubmitError, decode_upload, read_problem_text

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_login)])
home_router = APIRouter(include_in_schema=False)


def _strategies() -> list[str]:
    from search import STRATEGIES

    return list(STRATEGIES)


def _difficulties(cycles: list[dict]) -> list[str]:
    keys = {k for c in cycles for k in (c.get("heldout") or {})}
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _redirect(path: str, message: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode({'message': message})}", status_code=303)


@home_router.get("/")
def home():
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, status: Optional[str] = None, message: Optional[str] = None,
              svc: Service = Depends(service)):
    return page(request, "jobs.html", jobs=svc.list_jobs(status, None), status=status, message=message, refused=None,
                strategies=_strategies())


@router.post("/jobs/upload")
def upload_form(request: Request, file: UploadFile = File(...), refine: int = Form(1), strategy: str = Form(""),
                svc: Service = Depends(service)):
    """The jobs page's form: POST /api/jobs/upload's submission, answered with a page."""
    try:
        try:
            name, text = decode_upload(file.file.read(), file.filename)
        except SubmitError as exc:
            raise ApiError(422, str(exc)) from None
        done = svc.submit(lambda: read_problem_text(text, name, name), refine,
                          {"strategy": strategy} if strategy else {})
    except ApiError as exc:
        return page(request, "jobs.html", code=exc.status, jobs=svc.list_jobs(None, None), status=None, message=None,
                    refused=exc, strategies=_strategies())
    return _redirect("/jobs", f"submitted {len(done['job_ids'])} job(s) from {name}")


def _or_error_page(request: Request, render):
    """The page `render()` makes, or the error page with the refusal's status and line."""
    try:
        return render()
    except ApiError as exc:
        return page(request, "error.html", code=exc.status, message=exc.detail)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, svc: Service = Depends(service)):
    return _or_error_page(request, lambda: page(request, "job.html", job=svc.job(job_id)))


@router.get("/jobs/{job_id}/tree", response_class=HTMLResponse)
def tree_page(request: Request, job_id: str, svc: Service = Depends(service)):
    return _or_error_page(request, lambda: HTMLResponse(svc.tree_html(job_id)))


@router.get("/policies", response_class=HTMLResponse)
def policies_page(request: Request, message: Optional[str] = None, svc: Service = Depends(service)):
    return page(request, "policies.html", policies=svc.policies()[::-1], message=message)


@router.post("/policies/{version}/promote")
def promote_form(version: str, svc: Service = Depends(service)):
    try:
        done = svc.promote(version)
        message = f"{done['promoted']} promoted"
    except ApiError as exc:
        message = exc.detail
    return _redirect("/policies", message)


@router.post("/policies/rollback")
def rollback_form(svc: Service = Depends(service)):
    try:
        done = svc.rollback()
        message = f"rolled back: {done['promoted']} promoted, {done['previous']} rejected"
    except ApiError as exc:
        message = exc.detail
    return _redirect("/policies", message)


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, svc: Service = Depends(service)):
    return page(request, "runs.html", runs=svc.runs())


@router.get("/runs/{name}", response_class=HTMLResponse)
def run_page(request: Request, name: str, svc: Service = Depends(service)):
    def render():
        report = svc.run(name)
        cycles = report.get("cycles") or []
        return page(request, "run.html", name=name, report=report, cycles=cycles, keys=_difficulties(cycles),
                    curve=(svc.settings.runs_dir / name / "learning_curve.png").is_file())

    return _or_error_page(request, render)


router.add_api_route("/events", routes_api.events, methods=["GET"], response_class=StreamingResponse)
router.add_api_route("/runs/{name}/learning_curve.png", routes_api.curve, methods=["GET"], response_class=FileResponse)
