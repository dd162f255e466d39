"""A person in a real browser: upload the example photo, click Generate, see the image and the seed.

Runs Debian's Chromium headless through Playwright against the app on the tiny preset.
"""

import os
import shutil

import pytest

from tests.test_app import PHOTO, server  # noqa: F401 (the running app fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(server):  # noqa: F811
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is required for the browser test: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server, wait_until="networkidle")
        yield page
        browser.close()


def set_slider(page, label: str, value: int) -> None:
    box = page.get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")


def test_upload_generate_and_see_image_and_seed(page, tmp_path):
    page.get_by_text("tiny-random preset").wait_for()
    page.locator("input[type=file]").first.set_input_files(str(PHOTO))
    set_slider(page, "Width", 256)
    set_slider(page, "Height", 256)
    set_slider(page, "Number of steps", 2)
    page.get_by_label("Seed (-1 for random)").fill("1234")
    page.get_by_role("button", name="Generate").click()
    seed_box = page.get_by_label("Used seed")
    page.wait_for_function("el => el.value === '1234'", arg=seed_box.element_handle(), timeout=120_000)
    image = page.locator("#output-image img").first
    image.wait_for(state="visible", timeout=30_000)
    assert image.evaluate("img => img.naturalWidth") == 256
    # UI_SCREENSHOT=docs/ui.png refreshes the README's picture of the UI.
    page.screenshot(path=os.environ.get("UI_SCREENSHOT", str(tmp_path / "ui.png")), full_page=True)


def test_no_face_shows_the_message_in_the_page(page, tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (128, 128, 128)).save(blank)
    page.reload(wait_until="networkidle")
    page.locator("input[type=file]").first.set_input_files(str(blank))
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("No face found in the ID image").first.wait_for(timeout=120_000)


def test_an_example_row_fills_the_photo_and_generates(page):
    """The example photo comes from the app's own files: it must pass the upload-only check."""
    page.reload(wait_until="networkidle")
    page.get_by_text("portrait, color, cinematic", exact=True).last.click()  # the example row
    set_slider(page, "Width", 256)
    set_slider(page, "Height", 256)
    set_slider(page, "Number of steps", 2)
    page.get_by_role("button", name="Generate").click()
    seed_box = page.get_by_label("Used seed")
    page.wait_for_function("el => el.value === '42'", arg=seed_box.element_handle(), timeout=120_000)
