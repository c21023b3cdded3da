"""The web page's admin view in a real headless browser (Debian's chromium, driven by Playwright, as
tests/test_web.py drives the page), against an atelier with an admin's token and a user's.

An admin sees the whole queue and the runners, kept up to date from the cluster's event stream, and acts
on them from the page; a user sees no admin view at all.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.conftest import Cluster
from tests.test_web import WAIT_MS, browser  # noqa: F401  # the same browser, launched the same way

try:
    from playwright.sync_api import expect
except ImportError:  # test_web's browser fixture fails then, saying so
    expect = None

pytestmark = pytest.mark.timeout(180)

ADMIN = "web-admin-0123456789abcdef"
USER = "web-user-0123456789abcdef"
STEPS = 100  # of 0.05 s each: a job runs 5 s, long enough to be seen queued and running, and cancelled


@pytest.fixture(scope="module")
def atelier(atelier_home, tmp_path_factory):
    config = tmp_path_factory.mktemp("admin-web") / "atelier.toml"
    config.write_text(f"""
default_model = "slow-noop"

[node]
devices = ["cpu:0"]
device_budget_bytes = 3_000_000_000  # a device budget in bytes: what a VRAM lease takes its share of

[models.slow-noop]
family = "noop"
source = "builtin:noop"
options = {{step_s = 0.05}}

[[http.tokens]]
token = "{ADMIN}"
user = "web-admin"
role = "admin"

[[http.tokens]]
token = "{USER}"
user = "web-user"
""")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


def page_for(browser, token: str):  # noqa: F811
    """A page that has the token already (as one saved in the token dialog), and fails its test on any throw."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(f"localStorage.setItem('atelier.token', {json.dumps(token)})")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return context, page, errors


def submit(url: str, token: str, prompt: str) -> str:
    body = json.dumps({"model": "slow-noop", "prompt": prompt, "steps": STEPS}).encode()
    request = urllib.request.Request(f"{url}/v1/jobs", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["spec"]["id"]


def test_an_admin_sees_the_queue_and_runners_live_and_cancels_from_the_page(browser, atelier):  # noqa: F811
    context, page, errors = page_for(browser, ADMIN)
    try:
        page.goto(atelier.http + "/")
        admin = page.locator("#admin")
        expect(admin).to_be_visible()
        runner = page.locator("#admin-runners li.runner").first
        expect(runner).to_contain_text("idle")
        expect(runner).to_contain_text("cpu")

        jobs = [submit(atelier.http, USER, f"someone's job {n}") for n in range(3)]  # not the admin's own
        queue = page.locator("#admin-queue li")
        expect(queue).to_have_count(3)
        expect(page.locator("#admin-events li").first).to_contain_text("queue busy")  # from GET /v1/events
        expect(queue.first).to_contain_text("someone's job 0")
        expect(queue.first).to_contain_text("web-user")
        expect(page.locator("#admin-runners li.runner").first).to_contain_text(f"running {jobs[0]}")

        for job in reversed(jobs):  # the last queued first, the running one last
            page.get_by_role("button", name=f"Cancel job {job}").click()
            expect(page.locator(f'#admin-queue li[data-job="{job}"]')).to_have_count(0)
        expect(queue).to_have_count(0)
        expect(page.locator("#admin-events li").first).to_contain_text("queue idle")
        expect(page.locator("#admin-runners li.runner").first).to_contain_text("idle")
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def test_a_user_sees_no_admin_view(browser, atelier):  # noqa: F811
    context, page, errors = page_for(browser, USER)
    try:
        with page.expect_response(lambda response: "/v1/me" in response.url) as asked:
            page.goto(atelier.http + "/")
        assert asked.value.json() == {"user": "web-user", "admin": False}
        expect(page.get_by_label("Model")).to_have_value("slow-noop")  # the page itself is there
        expect(page.locator("#admin")).to_be_hidden()
        expect(page.locator("#admin-queue li")).to_have_count(0)
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def test_an_admin_pauses_and_resumes_the_queue_from_the_page(browser, atelier):  # noqa: F811
    context, page, errors = page_for(browser, ADMIN)
    try:
        page.goto(atelier.http + "/")
        state = page.locator("#queue-state")
        expect(state).to_have_text("Queue running")
        page.get_by_role("button", name="Pause queue").click()
        expect(state).to_have_text("Queue paused")
        expect(page.locator("#admin-events li").first).to_contain_text("paused")

        job = submit(atelier.http, USER, "waits for the queue")
        row = page.locator(f'#admin-queue li[data-job="{job}"]')
        expect(row).to_have_attribute("data-state", "queued")  # paused: nothing starts
        expect(page.locator("#admin-runners li.runner").first).to_contain_text("idle")

        page.get_by_role("button", name="Resume queue").click()
        expect(state).to_have_text("Queue running")
        expect(page.locator("#admin-events li").filter(has_text="resumed")).to_have_count(1)
        expect(row).to_have_attribute("data-state", "running")  # it starts once the queue is resumed
        page.get_by_role("button", name=f"Cancel job {job}").click()
        expect(row).to_have_count(0)
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def test_an_admin_sees_a_lease_on_the_runner_and_ends_it_from_the_page(browser, atelier):  # noqa: F811
    body = json.dumps({"device": "cpu:0", "bytes": "1GiB", "for_s": 120, "holder": "maw"}).encode()
    request = urllib.request.Request(f"{atelier.http}/v1/leases", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # 201 once granted
        lease = json.load(response)
    context, page, errors = page_for(browser, ADMIN)
    try:
        page.goto(atelier.http + "/")
        row = page.locator(f'#admin-leases li[data-lease="{lease["id"]}"]')
        expect(row).to_have_attribute("data-state", "granted")
        expect(row).to_contain_text("maw · 1.0 GiB on")
        expect(page.locator("#admin-runners li.runner").first).to_contain_text("leased 1.0 GiB")

        page.get_by_role("button", name=f"End lease {lease['id']}").click()
        expect(row).to_have_attribute("data-state", "ended")
        expect(page.locator("#admin-events li").first).to_contain_text("lease ended")
        expect(page.locator("#admin-runners li.runner").first).not_to_contain_text("leased")
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"
