"""The web view in a real browser: headless Chromium (Debian's chromium and chromium-driver, through Selenium) opens
the runs, jobs, policies and search-tree pages of a real `arbor serve` with real data (a run report, jobs run by a
real worker, recorded policy versions) and checks what a person sees. A screenshot of each page is saved in a
temporary folder; `ARBOR_SCREENSHOTS=docs/screenshots python -m pytest tests/test_web.py` refreshes the ones in
docs/ (a plain test run leaves the repository's files alone)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.support import wait_for
from tests.test_api import SEARCH, TOKEN, _counts, api_stack, write_run

SHOTS = Path(os.environ.get("ARBOR_SCREENSHOTS") or Path(tempfile.gettempdir()) / "arbor-screenshots")


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


pytestmark = pytest.mark.skipif(_chromium() is None, reason="chromium and chromedriver are not installed "
                                "(scripts/setup.sh installs Debian's chromium and chromium-driver with apt-get as root)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    with api_stack(root) as s:
        client, store = s["client"], s["store"]
        write_run(s["home"] / "runs", "label-free-demo")
        r = client.post("/api/jobs", json={"problems": [{"prompt": "12+34=", "answer": "64", "id": "web-12-34"},
                                                        {"prompt": "7+8=", "answer": "51", "id": "web-7-8"}],
                                           "refine": 3, "search": {**SEARCH, "strategy": "beam", "beams": 3}})
        assert r.status_code == 201, r.text
        ids = r.json()["job_ids"]
        wait_for(lambda: all(store.get_job(j).status == "done" for j in ids), 240, "the web test's jobs")
        v0 = store.promoted_policy()
        store.record_policy("v1", v0.path, v0.version, "rejected", {"train": {"train_loss": 0.41}},
                            {"gate_score": 0.42, "current_gate_score": 0.55, "heldout": {"2": 0.97, "4": 0.31}})
        store.record_policy("v2", v0.path, v0.version, "candidate", {"train": {"train_loss": 0.33}},
                            {"gate_score": 0.71, "current_gate_score": 0.55, "heldout": {"2": 0.99, "4": 0.62}})
        s["job_ids"] = ids
        yield s


@pytest.fixture(scope="module")
def browser(site):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        # a person logs in once with the token; the cookie carries it afterwards
        driver.get(f"{site['url']}/runs")
        assert "/login" in driver.current_url
        driver.find_element("id", "token").send_keys(TOKEN)
        driver.find_element("id", "login").click()
        wait_for(lambda: driver.current_url.endswith("/runs"), 20, "the login to land on /runs")
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(900, height + 40), 3000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def _rows(driver, table_id: str) -> list[list[str]]:
    rows = driver.find_elements("css selector", f"table#{table_id} tbody tr")
    return [[td.text for td in row.find_elements("tag name", "td")] for row in rows]


def test_runs_page_shows_the_curve_and_the_cycles(site, browser):
    browser.get(f"{site['url']}/runs")
    assert _rows(browser, "runs")[0][0] == "label-free-demo"
    browser.find_element("link text", "label-free-demo").click()
    wait_for(lambda: browser.current_url.endswith("/runs/label-free-demo"), 20, "the run page")
    curve = browser.find_element("id", "curve")
    loaded = wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", curve),
                      20, "the learning curve image")
    assert loaded > 300  # the PNG itself, not a broken-image icon
    cycles = _rows(browser, "cycles")
    assert [c[0] for c in cycles] == ["0", "1", "2"] and [c[-1] for c in cycles] == ["yes", "no", "yes"]
    header = [th.text for th in browser.find_elements("css selector", "table#cycles thead th")]
    assert "d=4" in header and cycles[2][header.index("d=4")] == "0.80"
    filters = _rows(browser, "filters")
    assert len(filters) == 6 and filters[4][2:] == ["format", "0.90", "0.900"]
    _shot(browser, "runs")


def test_jobs_page_and_a_jobs_rounds(site, browser):
    browser.get(f"{site['url']}/jobs")
    rows = {r[2]: r for r in _rows(browser, "jobs")}
    assert {"web-12-34", "web-7-8"} <= set(rows)
    assert rows["web-12-34"][3] == "done" and rows["web-12-34"][5] == "3" and rows["web-12-34"][7] == "no"
    _shot(browser, "jobs")
    job_id = site["job_ids"][0]
    browser.find_element("css selector", f'tr[data-job="{job_id}"] a').click()
    wait_for(lambda: browser.current_url.endswith(f"/jobs/{job_id}"), 20, "the job page")
    assert browser.find_element("id", "status").text == "done"
    job = site["client"].get(f"/api/jobs/{job_id}").json()
    rounds = _rows(browser, "rounds")
    assert [r[0] for r in rounds] == ["0", "1", "2"]  # an untrained policy never gets the answer: every round runs
    assert rounds[1][1] == "12+34="  # the position-coupled built-in policy is shown no history: it repairs
    assert [" ".join(r[2].split()) for r in rounds] == [" ".join(r["best"]["completion"].split()) for r in job["refinement"]]
    # how each round searched and its verdict are visible (with the resamples a repeated answer cost)
    assert [row[3] for row in rounds] == [r["how"] for r in job["refinement"]] and rounds[1][3].startswith("repair")
    assert all(row[4].startswith(r["verdict"]) for row, r in zip(rounds, job["refinement"]))
    assert rounds[0][4].startswith("rejected by the exact checker")
    assert " ".join(job["best"]["completion"].split()) in " ".join(browser.find_element("id", "best").text.split())
    _shot(browser, "job")


def _status_of(driver, problem_id: str) -> str | None:
    for row in driver.find_elements("css selector", "table#jobs tbody tr"):
        cells = row.find_elements("tag name", "td")
        if cells[2].text == problem_id:
            return cells[3].text
    return None


def test_submitting_from_the_jobs_page_and_following_it_live(site, browser, tmp_path):
    store, url = site["store"], site["url"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n{"prompt": "2+2=", "checker": "eval"}\n')
    before = _counts(store)
    browser.get(f"{url}/jobs")
    browser.find_element("id", "upload-file").send_keys(str(bad))
    browser.find_element("id", "upload-submit").click()
    wait_for(lambda: browser.find_elements("id", "refused"), 20, "the refusal")
    refused = browser.find_element("id", "refused").text
    assert "2 bad line(s) in bad.jsonl; nothing was submitted" in refused
    assert "line 2: not valid JSON" in refused and "line 3: field 'checker' is 'eval'" in refused
    assert _counts(store) == before  # nothing stored from a refused upload

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "9+9=", "answer": "81", "id": "web-live"}\n')
    worker = site["procs"][1]
    os.killpg(worker.proc.pid, signal.SIGSTOP)  # the job waits in the queue while the page is open
    try:
        browser.get(f"{url}/jobs")
        browser.find_element("id", "upload-file").send_keys(str(good))
        browser.find_element("id", "upload-submit").click()
        wait_for(lambda: browser.find_elements("id", "message"), 20, "the submission's message")
        assert browser.find_element("id", "message").text == "submitted 1 job(s) from good.jsonl"
        assert _status_of(browser, "web-live") == "queued"
        browser.execute_script("window.arborStayed = true")  # gone if the page reloads
        wait_for(lambda: browser.find_element("id", "live").text == "live", 20, "the event stream to open")
    finally:
        os.killpg(worker.proc.pid, signal.SIGCONT)
    wait_for(lambda: _status_of(browser, "web-live") == "done", 120, "the row to turn done over server-sent events")
    assert browser.execute_script("return window.arborStayed === true")  # updated in place, not reloaded
    job = next(j for j in site["client"].get("/api/jobs").json() if j["problem_id"] == "web-live")
    row = browser.find_element("css selector", f'tr[data-job="{job["job_id"]}"]')
    wait_for(lambda: row.find_elements("tag name", "td")[7].text == "no", 20, "the row's verdict")
    cells = [td.text for td in row.find_elements("tag name", "td")]
    assert cells[4] == "1" and " ".join(cells[6].split()) == " ".join(job["best"]["completion"].split())
    _shot(browser, "jobs-live")


def test_a_jobs_search_tree(site, browser):
    job_id = site["job_ids"][0]
    browser.get(f"{site['url']}/jobs/{job_id}")
    browser.find_element("id", "tree-link").click()
    wait_for(lambda: browser.current_url.endswith(f"/jobs/{job_id}/tree"), 20, "the tree page")
    titles = [h.text for h in browser.find_elements("tag name", "h3")]
    assert len(titles) == 3 and titles[0].startswith(f"job {job_id}, round 0 (beam")
    assert browser.find_elements("css selector", "details.best > summary")  # the chosen path, open and marked
    assert browser.find_elements("css selector", "details details")  # steps under the prompt
    _shot(browser, "tree")


def test_policies_page_marks_the_promoted_version_and_the_gate_refuses(site, browser):
    browser.get(f"{site['url']}/policies")
    rows = {r[0]: r for r in _rows(browser, "policies")}
    assert set(rows) == {"v0", "v1", "v2"}
    assert rows["v0"][1] == "★ promoted" and rows["v1"][1] == "rejected" and rows["v2"][6] == "0.710"
    assert rows["v2"][8].split() == ["d2", "0.99", "d4", "0.62"]
    # kind, size and prompt format, read from each version's folder
    assert rows["v0"][3] == "full" and rows["v0"][4].endswith(("KB", "MB")) and rows["v0"][5] == "raw", rows["v0"]
    browser.find_element("css selector", 'tr[data-version="v1"] button').click()  # 0.42 does not beat 0.55
    wait_for(lambda: browser.find_elements("id", "message"), 20, "the gate's answer")
    assert "does not beat" in browser.find_element("id", "message").text
    assert {r[0]: r for r in _rows(browser, "policies")}["v0"][1] == "★ promoted"
    _shot(browser, "policies")
