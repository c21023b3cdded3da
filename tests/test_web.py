"""The web page in a real headless browser (Debian's chromium, driven by Playwright) against a running atelier.

Each test does what a user does (types, clicks) and checks what they would see. The browser and
Playwright are required, not optional: without them these tests fail, so CI cannot pass unseen.
``ATELIER_WEB_SCREENSHOT=docs/web.png`` makes the live test save the README's screenshot.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from tests.catalog import guided_sd
from tests.conftest import Cluster
from tests.test_frontends_conditioning import png

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture fails then, saying so: these tests must never be skipped
    expect = sync_playwright = None

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; `make test` installs it
# Known to work headless as root on a machine with no display, no GPU and no internet.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 20_000  # the longest the page may take to show anything
JOB_MS = 60_000  # and a job to end: generous, for a 2-core machine that other work shares

# The big image records every image it shows (data-prompt and src, in order), so a test can tell
# what a user saw even when several previews land between two looks.
RECORD_STAGE = """() => {
  const img = document.querySelector('#preview');
  window.shown = [];
  new MutationObserver(() => window.shown.push({prompt: img.dataset.prompt, src: img.getAttribute('src')}))
    .observe(img, {attributes: true, attributeFilter: ['src']});
}"""


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.fail("Playwright is missing: `make test` installs it (the dev extra of pyproject.toml)",
                    pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium)",
                    pytrace=False)
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def atelier(atelier_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("web")
    config = folder / "atelier.toml"
    # The default rates: live typing has a limit of its own (live_per_minute), not the user's jobs'.
    # missing-sd names a checkpoint that is not there: its jobs fail, with the reason. guided-sd has
    # ControlNets and an IP-Adapter.
    config.write_text(f'builtin_models = true\n[models.missing-sd]\nfamily = "sd1"\n'
                      f'source = "{folder / "nowhere"}"\ndefault_width = 64\ndefault_height = 64\n'
                      + guided_sd(atelier_home))
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 820})  # a fresh localStorage each test
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def set_parameters(page, **values) -> None:
    if page.locator("#params").get_attribute("open") is None:
        page.get_by_text("Parameters").click()
    for label, value in values.items():
        page.get_by_label(label.capitalize(), exact=True).fill(str(value))


def natural_size(img) -> list[int]:
    return img.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")


def save_screenshot(page, path: str) -> None:
    """The README's picture: a job running, one waiting behind it, the gallery below."""
    from PIL import Image

    page.get_by_label("Live").uncheck()
    page.set_viewport_size({"width": 1200, "height": 900})
    prompts = {"a lighthouse on a cliff at dusk, oil on canvas": 500, "a harbour in the fog": 499}
    for prompt, steps in prompts.items():
        page.get_by_label("Prompt", exact=True).fill(prompt)
        set_parameters(page, steps=steps)
        page.get_by_role("button", name="Generate").click()
    running = page.locator("#jobs li").filter(has_text="a lighthouse on a cliff").first
    running.click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Step 1\d\d/500"), timeout=JOB_MS)
    page.screenshot(path=path)
    # Fewer colours: the noise of the tiny models' images would otherwise make the file large.
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    for prompt in prompts:
        page.locator("#jobs li").filter(has_text=prompt).first.get_by_role("button", name="Cancel").click()


def jobs_of(url: str, token: str | None = None) -> list[dict]:
    request = urllib.request.Request(f"{url}/v1/jobs",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["jobs"]


# --------------------------------------------------------------------------- #


def test_generate_shows_previews_then_the_image_in_the_gallery_and_survives_a_reload(page, atelier):
    page.goto(atelier.http + "/")
    expect(page.get_by_label("Model")).to_have_value("tiny-sd")  # the catalog came, the default chosen
    expect(page.get_by_label("Width")).to_have_value("64")  # and its defaults filled in
    page.evaluate(RECORD_STAGE)
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    set_parameters(page, steps=6)
    page.get_by_role("button", name="Generate").click()

    expect(page.locator("#status")).to_have_text("Done", timeout=JOB_MS)
    # The finished image is fetched after the job says done: wait for it to be shown.
    expect(page.locator("#preview")).to_have_attribute("src", re.compile(r"^blob:"))
    shown = page.evaluate("window.shown")
    previews = {s["src"] for s in shown if s["src"].startswith("data:image/jpeg;base64,")}
    assert len(previews) >= 2, shown  # the preview changed as the steps went by
    assert shown[-1]["src"].startswith("blob:") and shown[-1]["prompt"] == "a lighthouse at dusk"  # then the image

    tile = page.locator("#gallery .tile").first
    expect(tile).to_have_attribute("data-prompt", "a lighthouse at dusk")
    expect(tile.locator("img")).to_have_attribute("src", re.compile(r"^blob:"))
    assert natural_size(tile.locator("img")) == [64, 64]
    tile.click()  # opens full size
    expect(page.locator("#viewer")).to_be_visible()
    assert natural_size(page.locator("#viewer-img")) == [64, 64]
    page.get_by_role("button", name="Close").click()
    expect(page.locator("#viewer")).to_be_hidden()

    page.reload()
    expect(page.locator("#gallery .tile").first).to_have_attribute("data-prompt", "a lighthouse at dusk")
    row = page.locator("#jobs li").filter(has_text="a lighthouse at dusk").first
    expect(row).to_contain_text("Done")


def test_queue_position_and_cancel(page, atelier):
    page.goto(atelier.http + "/")
    expect(page.get_by_label("Model")).to_have_value("tiny-sd")
    page.get_by_label("Prompt", exact=True).fill("a long job")
    set_parameters(page, steps=500)
    page.get_by_role("button", name="Generate").click()
    # Its first step may wait for the model's load, which a busy machine slows: a job's time, not a page's.
    expect(page.locator("#status")).to_have_text(re.compile(r"^Step \d+/500"), timeout=JOB_MS)

    # A second job waits behind the first (different steps: no batch); it shows its place in line.
    page.get_by_label("Prompt", exact=True).fill("a job behind it")
    set_parameters(page, steps=499)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#stage")).to_have_attribute("data-state", "queued")
    expect(page.locator("#status")).to_have_text(re.compile(r"^#1 in queue"))

    page.locator("#stage").get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Cancelled"))
    long_row = page.locator("#jobs li").filter(has_text="a long job").first
    long_row.get_by_role("button", name="Cancel").click()
    expect(long_row).to_contain_text("Cancelled")
    expect(long_row.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.locator("#jobs li").filter(has_text="a job behind it").first).to_contain_text("Cancelled")


def test_a_failed_job_shows_its_reason(page, atelier):
    page.goto(atelier.http + "/")
    page.get_by_label("Model").select_option("missing-sd")
    page.get_by_label("Prompt", exact=True).fill("a checkpoint that is not there")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^Failed: .*does not exist"), timeout=JOB_MS)
    row = page.locator("#jobs li").filter(has_text="a checkpoint that is not there").first
    expect(row).to_contain_text("does not exist")
    expect(page.locator("#gallery .tile").filter(has=page.locator('[alt="a checkpoint that is not there"]'))) \
        .to_have_count(0)


def test_live_mode_shows_the_last_typed_prompt(page, atelier):
    text = "a red boat"
    page.goto(atelier.http + "/")
    expect(page.get_by_label("Model")).to_have_value("tiny-sd")
    # Enough steps that each job is still running when the next key comes: the scheduler supersedes it.
    set_parameters(page, steps=30)
    page.get_by_label("Live").check()
    page.evaluate(RECORD_STAGE)
    page.get_by_label("Prompt", exact=True).click()
    page.keyboard.type(text, delay=200)  # slower than the debounce: every prefix is submitted

    final = page.locator("#preview.final")
    expect(final).to_have_attribute("data-prompt", text, timeout=JOB_MS)
    expect(page.locator("#gallery .tile").first).to_have_attribute("data-prompt", text)
    page.wait_for_timeout(1000)  # nothing late may take its place
    expect(final).to_have_attribute("data-prompt", text)

    # What the big image showed went forward with the typing, never back to an older prompt.
    prompts = [s["prompt"] for s in page.evaluate("window.shown")]
    assert prompts and prompts[-1] == text
    assert all(text.startswith(p) for p in prompts), prompts
    assert [len(p) for p in prompts] == sorted(len(p) for p in prompts), prompts
    # One live session is one picture in the gallery.
    assert page.locator("#gallery .tile[data-session]").count() == 1

    live = [job for job in jobs_of(atelier.http) if job["spec"]["priority"] == "live"]
    assert live[0]["spec"]["prompt"] == text and live[0]["state"] == "done"
    assert any("superseded" in (job["reason"] or "") for job in live), live  # the typing did supersede
    # Live jobs stay out of the job list: it holds the other tests' jobs, which the page restored, and no more.
    listed = [j for j in jobs_of(atelier.http) if j["spec"]["priority"] != "live"]
    assert page.locator("#jobs li").count() == len(listed)

    if os.environ.get("ATELIER_WEB_SCREENSHOT"):
        save_screenshot(page, os.environ["ATELIER_WEB_SCREENSHOT"])


def test_a_token_is_asked_for_kept_and_sent_only_in_headers(browser, compat_http):
    # The page as an HTTP server with tokens serves it: the shared atelier's, with a user of this test's own.
    token = compat_http.token("web")
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = context.new_page()
        sent: list[tuple[str, str | None]] = []
        page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
        page.goto(compat_http.url + "/")

        dialog = page.locator("#auth")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text("needs a bearer token")
        page.get_by_label("Token", exact=True).fill("not-this-one-0123456789")
        page.get_by_role("button", name="Save").click()
        expect(dialog).to_contain_text("not one of this server's")  # asked again
        page.get_by_label("Token", exact=True).fill(token)
        page.get_by_role("button", name="Save").click()
        expect(dialog).to_be_hidden()
        expect(page.get_by_label("Model")).to_have_value("tiny-sd")

        page.get_by_label("Prompt", exact=True).fill("a key")
        set_parameters(page, steps=2)
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#status")).to_have_text("Done", timeout=JOB_MS)
        img = page.locator("#gallery .tile img").first
        expect(img).to_have_attribute("src", re.compile(r"^blob:"))
        assert natural_size(img) == [64, 64]

        page.reload()  # the token is remembered: no question, and the job is still the user's
        expect(page.locator("#gallery .tile").first).to_have_attribute("data-prompt", "a key")
        expect(dialog).to_be_hidden()
        assert [job["spec"]["user"] for job in jobs_of(compat_http.url, token)] == ["compat-web"]
    finally:
        context.close()

    assert not [url for url, _ in sent if token in url]
    calls = [(url, header) for url, header in sent if "/v1/" in url]
    assert any("/events" in url for url, _ in calls) and any("/v1/artifacts/" in url for url, _ in calls)
    assert all(header == f"Bearer {token}" for url, header in calls if "/v1/artifacts/" in url or "/events" in url)


def test_each_model_gets_its_own_fields_and_its_output_plays(page, atelier, tmp_path):
    from PIL import Image

    page.goto(atelier.http + "/")
    expect(page.get_by_label("Model")).to_have_value("tiny-sd")
    page.get_by_text("Parameters").click()
    expect(page.get_by_label("Frames")).to_be_hidden()
    expect(page.get_by_label("Seconds")).to_be_hidden()

    # A sound: its length instead of a size; it plays in the page and in the viewer.
    page.get_by_label("Model").select_option("tiny-audioldm2")
    expect(page.get_by_label("Seconds")).to_have_value("1")
    expect(page.get_by_label("Width")).to_be_hidden()
    page.get_by_label("Prompt", exact=True).fill("rain on a tin roof")
    page.get_by_label("Seconds").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text("Done", timeout=JOB_MS)
    expect(page.locator("#audio")).to_be_visible()
    expect(page.locator("#audio")).to_have_attribute("src", re.compile(r"^blob:"))
    duration = page.locator("#audio").evaluate(
        "a => a.readyState >= 1 ? a.duration"
        " : new Promise(r => a.addEventListener('loadedmetadata', () => r(a.duration)))")
    assert abs(duration - 0.5) < 0.05
    page.locator("#gallery .tile").filter(has_text="rain on a tin roof").click()
    expect(page.locator("#viewer-audio")).to_be_visible()
    expect(page.locator("#viewer-img")).to_be_hidden()
    page.get_by_role("button", name="Close").click()

    # A video: frames and rate; the MP4 plays where the image was.
    page.get_by_label("Model").select_option("tiny-animatediff")
    expect(page.get_by_label("Frames")).to_have_value("4")
    page.get_by_label("Prompt", exact=True).fill("a spinning top")
    set_parameters(page, frames=3, steps=2)
    page.get_by_role("button", name="Generate").click()
    # The status still says "Done" of the sound until this job's first event: its own tile says it ended.
    expect(page.locator('#gallery .tile[data-prompt="a spinning top"]')).to_have_count(1, timeout=JOB_MS)
    expect(page.locator("#status")).to_have_text("Done", timeout=JOB_MS)
    expect(page.locator("#video")).to_be_visible()
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#gallery .tile video").first).to_have_attribute("src", re.compile(r"^blob:"))

    # From an image: the upscaler needs one, and the result is four times the input.
    page.get_by_label("Model").select_option("tiny-sd-upscaler")
    expect(page.get_by_label("Image", exact=False).first).to_be_visible()
    expect(page.locator("#image-hint")).to_have_text("(upscale: needed)")
    source = tmp_path / "small.png"
    Image.new("RGB", (24, 16), (30, 90, 200)).save(source)
    page.locator("#image").set_input_files(str(source))
    expect(page.get_by_label("Width")).to_be_hidden()  # the image's own size
    page.get_by_label("Prompt", exact=True).fill("sharper")
    set_parameters(page, steps=2)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator('#gallery .tile[data-prompt="sharper"]')).to_have_count(1, timeout=JOB_MS)
    expect(page.locator("#status")).to_have_text("Done", timeout=JOB_MS)
    expect(page.locator("#video")).to_be_hidden()
    expect(page.locator("#preview")).to_have_attribute("src", re.compile(r"^blob:"))
    assert natural_size(page.locator("#preview")) == [96, 64]


def test_a_controlnet_and_a_reference_image_for_the_models_that_have_them(page, atelier, tmp_path):
    from PIL import Image

    edges, look = tmp_path / "edges.png", tmp_path / "look.png"
    edges.write_bytes(png(1))
    look.write_bytes(png(2, 48))
    page.goto(atelier.http + "/")
    expect(page.get_by_label("Model")).to_have_value("tiny-sd")
    controlnet, reference = page.get_by_label("ControlNet", exact=True), page.get_by_label("Reference image")
    expect(controlnet).to_be_hidden()  # tiny-sd has neither
    expect(reference).to_be_hidden()

    page.get_by_label("Model").select_option("guided-sd")
    expect(controlnet).to_be_visible()
    assert controlnet.locator("option").all_inner_texts() == ["none", "canny", "depth"]
    expect(page.get_by_label("Control image")).to_be_hidden()  # until a ControlNet is chosen
    controlnet.select_option("canny")
    page.locator("#control_image").set_input_files(str(edges))
    page.get_by_label("ControlNet scale").fill("0.8")
    page.get_by_label("Prompt", exact=True).fill("a cube along the edges")
    page.get_by_role("button", name="Generate").click()
    # The finished image of this job (the page may have restored older ones of the module's other tests).
    final = page.locator("#preview.final")
    expect(final).to_have_attribute("data-prompt", "a cube along the edges", timeout=JOB_MS)
    expect(final).to_have_attribute("src", re.compile(r"^blob:"))
    assert natural_size(final) == [64, 64]
    row = page.locator("#jobs li").filter(has_text="a cube along the edges").first
    expect(row).to_contain_text("Done")
    expect(row).to_contain_text("ControlNet canny")

    # The reference image: an image as a prompt, beside the control image.
    expect(page.get_by_label("Reference scale")).to_be_hidden()  # until there is a reference image
    page.locator("#ip_adapter_image").set_input_files(str(look))
    page.get_by_label("Reference scale").fill("0.6")
    page.get_by_label("Prompt", exact=True).fill("a cube that looks like that")
    page.get_by_role("button", name="Generate").click()
    row = page.locator("#jobs li").filter(has_text="a cube that looks like that").first
    expect(row).to_contain_text("Done", timeout=JOB_MS)  # the status still says the last job's Done at first
    expect(row).to_contain_text("reference image")

    # What the server got and made: the PNGs say which ControlNet and scales shaped them.
    made = {job["spec"]["prompt"]: job for job in jobs_of(atelier.http)}
    edged, looked = made["a cube along the edges"], made["a cube that looks like that"]
    assert edged["spec"]["inputs"] == ["control_image"] and looked["spec"]["inputs"] == ["control_image",
                                                                                          "ip_adapter_image"]
    with urllib.request.urlopen(looked["urls"][0], timeout=10) as response:
        parameters = Image.open(io.BytesIO(response.read())).info["parameters"]
    assert "ControlNet: canny, ControlNet weight: 0.8" in parameters and "IP-Adapter weight: 0.6" in parameters

    # Back on a model without them: the fields go, and nothing of them is sent.
    page.get_by_label("Model").select_option("tiny-sd")
    expect(controlnet).to_be_hidden()
    expect(reference).to_be_hidden()
    page.get_by_label("Prompt", exact=True).fill("a plain cube")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#jobs li").filter(has_text="a plain cube").first).to_contain_text("Done", timeout=JOB_MS)
    plain = next(job for job in jobs_of(atelier.http) if job["spec"]["prompt"] == "a plain cube")
    assert plain["spec"]["inputs"] == [] and plain["spec"]["controlnet"] is None
