"""Rendering the web view's pages: jinja2 templates under arbor/web/templates (no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

from agent.schema import JOB_FINISHED, JOB_STATES
from agent.versions import shown_size

WEB = Path(__file__).resolve().parents[1] / "web"


def _fmt(value, spec: str = ".3f") -> str:
    """A number formatted (`{{ x | fmt }}`, `{{ x | fmt(".0f") }}`); anything else as text, None as nothing."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


templates = Jinja2Templates(directory=str(WEB / "templates"))
templates.env.filters["fmt"] = _fmt
templates.env.filters["size"] = shown_size
templates.env.globals.update(job_states=JOB_STATES, job_finished=JOB_FINISHED)


def page(request: Request, template: str, code: int = 200, **context):
    """A page; `auth` tells the template whether to show the logout button."""
    return templates.TemplateResponse(request, template, {"auth": request.app.state.token is not None, **context},
                                      status_code=code)
