"""End-to-end: `python app.py` in a subprocess, driven by headless Debian chromium through Playwright
(issue #4). Pick a layer, move the rank slider, see the plot change, generate, see two images.

Runs on the embedded model when assets/tiny-pixart exists, else on a tiny random PixArt-Σ pipeline
saved to a temp folder (the ``--model PATH`` path). Skips, saying why, only when chromium or the
Playwright package is missing. ``DIROTQ_SCREENSHOTS=DIR`` also writes two screenshots per tab there, at
1500 and 1920 px wide, as 256-colour PNGs (how docs/screenshots/ was made); ``DIROTQ_TEST_MODEL=PATH`` runs it
on another pipeline folder. The app and chromium are set up by benchmarks/_browser.py, which the browser
benchmark shares.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from benchmarks._browser import chromium_path, launch_chromium, plot_fits, save_small_png, start_app, stop_app

CHROMIUM = chromium_path()

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(scripts/install.sh --test does) — Playwright cannot download browsers offline")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -r requirements.txt)")
    pw = sync_playwright().start()
    try:
        browser = launch_chromium(pw, CHROMIUM)
    except Exception as e:  # a broken chromium install is an environment problem, say so
        pw.stop()
        pytest.skip(f"chromium at {CHROMIUM} does not start: {e}")
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dirotq.pipelines import DEFAULT_MODEL

    if os.environ.get("DIROTQ_TEST_MODEL"):
        return os.environ["DIROTQ_TEST_MODEL"]
    if (Path(DEFAULT_MODEL) / "model_index.json").is_file():
        return DEFAULT_MODEL
    from tiny_pipelines import build_tiny_pixart_pipeline

    out = tmp_path_factory.mktemp("tiny-pipe")
    build_tiny_pixart_pipeline().save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("app-cache")
    log = tmp_path_factory.mktemp("app-log") / "app.log"
    try:
        proc, url = start_app(model_dir, str(cache), log, timeout=90)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url
    stop_app(proc)


def _plot_title(page, elem_id: str) -> str:
    loc = page.locator(f"#{elem_id} .gtitle").first
    loc.wait_for(state="attached", timeout=30_000)
    return loc.text_content() or ""


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, pattern: str, timeout: float = 90.0) -> str:
    t = time.time() + timeout
    while time.time() < t:
        text = _status(page)
        if re.search(pattern, text):
            return text
        if "⚠" in text:
            raise AssertionError(f"the app reported an error: {text}")
        time.sleep(0.25)
    raise AssertionError(f"status never matched {pattern!r}; last: {_status(page)!r}")


def test_browser_end_to_end(browser_or_skip, server, tmp_path):
    shots = os.environ.get("DIROTQ_SCREENSHOTS")
    page = browser_or_skip.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(server, wait_until="domcontentloaded", timeout=60_000)
    page.get_by_role("button", name="Calibrate").wait_for(timeout=30_000)
    _wait_status(page, r"Calibrate|✓", 30)

    # calibrate (gr.Progress), then the spectrum is drawn
    page.get_by_role("button", name="Calibrate").click()
    _wait_status(page, r"✓ statistics", 120)
    title0 = _plot_title(page, "plot-spectrum")
    assert "keeps" in title0

    # pick a layer: another layer type in the same block
    page.locator("#layer-type input").click()
    page.get_by_role("option", name="attn1.to_out.0").click()
    t = time.time() + 30
    while time.time() < t and "to_out" not in _plot_title(page, "plot-spectrum"):
        time.sleep(0.2)
    title1 = _plot_title(page, "plot-spectrum")
    assert "to_out" in title1, title1

    # move the rank slider (a click on the track: pointer down + up = "release")
    track = page.locator("#rank input[type=range]")
    box = track.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2)
    t = time.time() + 30
    while time.time() < t and _plot_title(page, "plot-spectrum") == title1:
        time.sleep(0.2)
    title2 = _plot_title(page, "plot-spectrum")
    assert title2 != title1, "the spectrum did not redraw after the rank slider moved"
    m = re.search(r"r = (\d+)", title2)
    assert m and int(m.group(1)) > 0
    assert f"top {m.group(1)} of" in page.locator("#energy").inner_text()
    page.screenshot(path=str(tmp_path / "spectrum.png"))

    # typing a rank into the slider's box redraws when the box loses focus
    num = page.locator("#rank input[type=number]")
    num.fill("3")
    page.locator("#energy").click()
    t = time.time() + 30
    while time.time() < t and "r = 3 " not in _plot_title(page, "plot-spectrum"):
        time.sleep(0.2)
    assert "r = 3 " in _plot_title(page, "plot-spectrum")

    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        block = os.environ.get("DIROTQ_SHOT_BLOCK")
        if block:
            page.locator("#block input").click()
            page.get_by_role("option", name=f"block {block}", exact=True).click()
            time.sleep(2)
        layer = os.environ.get("DIROTQ_SHOT_LAYER")
        if layer:
            page.locator("#layer-type input").click()
            page.get_by_role("option", name=layer, exact=True).click()
            time.sleep(2)
        num.fill(os.environ.get("DIROTQ_SHOT_RANK", "32"))
        page.locator("#energy").click()
        time.sleep(2)
        _shot(page, f"{shots}/spectrum.png")
        short = _plot_title(page, "plot-spectrum").split(":")[0]
        for tab, fname, wait_id in (("Outliers", "outliers", "plot-outliers"), ("Error vs rank", "error_vs_rank",
                                                                                  "plot-error")):
            page.get_by_role("tab", name=tab).click()  # a hidden tab is drawn when it is selected
            _wait_for(lambda: _plot_title(page, wait_id).startswith(short), f"the {tab} tab of {short}")
            if tab == "Error vs rank":  # the teaching view: methods compared at equal 16-bit cost
                page.get_by_label("extra 16-bit parameters").check()
                _wait_for(lambda: "16-bit parameters" in _plot_title(page, wait_id), "the cost axis")
            time.sleep(0.5)
            _shot(page, f"{shots}/{fname}.png")
        # one token group, with an outlier planted: the scale collapse in the original basis
        page.get_by_role("tab", name="One group").click()
        _wait_for(lambda: _plot_title(page, "plot-group").startswith(short), "the One group tab")
        page.locator("#group-plant input[type=number]").fill(os.environ.get("DIROTQ_SHOT_PLANT", "40"))
        page.locator("#group-token input").click()
        _wait_for(lambda: "planted" in _plot_title(page, "plot-group"), "the planted outlier")
        time.sleep(0.5)
        _shot(page, f"{shots}/one_group.png", full_page=True)
        page.get_by_role("tab", name="Rank plan").click()
        page.get_by_role("button", name="Fill").click()
        _wait_status(page, r"plan filled", 60)
        # the budget and measured plots are drawn after the fill (chained events)
        _wait_for(lambda: "predicted" in _plot_title(page, "plot-budget").lower()
                  or "output error" in _plot_title(page, "plot-budget").lower(), "the budget plot")
        _wait_for(lambda: page.locator("#plot-measured .shapelayer path").count() > 0
                  or "embedded" in page.locator("#plot-measured").inner_text(), "the measured plot")
        time.sleep(0.5)
        _shot(page, f"{shots}/rank_plan.png", full_page=True)
        page.get_by_role("tab", name="All layers").click()
        page.locator("#all-sens input").check()  # measured by the output-error fill above
        page.get_by_role("button", name="Compute for this method and rank plan").click()
        _wait_status(page, r"layers quantized", 120)
        _plot_title(page, "plot-all")
        time.sleep(0.5)
        _shot(page, f"{shots}/all_layers.png", full_page=True)

    # generate: two images side by side
    page.get_by_role("tab", name="Generate").click()
    page.get_by_role("button", name="Generate").click()
    _wait_status(page, r"✓ generated", 120)
    for elem in ("img-ref", "img-q"):
        img = page.locator(f"#{elem} img").first
        img.wait_for(state="visible", timeout=30_000)
        assert img.evaluate("i => i.complete && i.naturalWidth > 0")
    assert "PSNR" in page.locator("#gen-info").inner_text()
    # at 1280×800 each image's label stays clear of its toolbar icons (issue #21: they covered it)
    page.set_viewport_size({"width": 1280, "height": 800})
    time.sleep(1.0)
    for elem in ("img-ref", "img-q", "img-diff"):
        label = page.locator(f"#{elem} [data-testid=block-label]").bounding_box()
        icons = page.locator(f"#{elem} .icon-button-wrapper").bounding_box()
        assert label["x"] + label["width"] <= icons["x"], (elem, label, icons)
    page.set_viewport_size({"width": 1500, "height": 1000})
    # the app keeps no run history: gradio 6 would re-serialise it, figures included, after every event
    assert not page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('gradio:run-history'))")
    out = tmp_path / "generate.png"
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
    if shots:
        _shot(page, f"{shots}/generate.png", full_page=True)
        page.get_by_role("tab", name="About").click()
        time.sleep(0.3)
        _shot(page, f"{shots}/about.png", full_page=True)
        # every tab again at 1920×1080, resized while most were hidden: each plot takes the width it has
        page.set_viewport_size({"width": 1920, "height": 1080})
        time.sleep(1.5)
        for tab, fname, plot_id in SHOT_TABS:
            page.get_by_role("tab", name=tab).click()
            if plot_id:
                _wait_for(lambda: plot_fits(page, plot_id), f"the {tab} plot at the full width")
            time.sleep(1.0)
            _shot(page, f"{shots}/{fname}_1920.png", full_page=True)
    page.close()


# (tab, screenshot name, its plot's elem_id or None) in the order of the app's tabs
SHOT_TABS = (("Spectrum", "spectrum", "plot-spectrum"), ("Outliers", "outliers", "plot-outliers"),
             ("Error vs rank", "error_vs_rank", "plot-error"), ("One group", "one_group", "plot-group"),
             ("All layers", "all_layers", "plot-all"), ("Rank plan", "rank_plan", "plot-budget"),
             ("Generate", "generate", None), ("About", "about", None))


def _shot(page, path: str, full_page: bool = False) -> None:
    """A screenshot for docs/screenshots/, as a small PNG (256 colours)."""
    save_small_png(page.screenshot(full_page=full_page), path)


def _wait_for(cond, what: str, timeout: float = 30.0):
    """Poll ``cond()`` until it returns something truthy; fail saying ``what`` was awaited."""
    t = time.time() + timeout
    last = None
    while time.time() < t:
        last = cond()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _rank_in_title(title: str) -> int:
    m = re.search(r"r = (\d+)", title)
    assert m, title
    return int(m.group(1))


def test_browser_every_control_redraws_the_selected_layer(browser_or_skip, server):
    """Issue #21 items 1–3: the block switch (keeping the layer type), a rank typed into the box (in and out
    of range), a tab opened later and a plan-table edit each leave every view showing the same layer and
    rank; the error plot's cost axis and the One group tab's planted outlier redraw their tab."""
    page = browser_or_skip.new_page(viewport={"width": 1280, "height": 800})
    page.goto(server, wait_until="domcontentloaded", timeout=60_000)
    page.get_by_role("button", name="Calibrate").wait_for(timeout=30_000)
    _wait_status(page, r"Calibrate|✓", 30)
    page.get_by_role("button", name="Calibrate").click()
    _wait_status(page, r"✓ statistics .*prompts ×", 120)
    spectrum = lambda: _plot_title(page, "plot-spectrum")  # noqa: E731
    label = lambda: page.locator("#layer-label").inner_text()  # noqa: E731
    num = page.locator("#rank input[type=number]")
    assert spectrum().startswith("b0.attn1.to_q:"), spectrum()

    # block 0 -> block 3, the layer type stays attn1.to_q: title and label follow the block
    page.locator("#block input").click()
    page.get_by_role("option", name="block 3", exact=True).click()
    _wait_for(lambda: spectrum().startswith("b3.attn1.to_q:"), "the spectrum of b3.attn1.to_q")
    assert "transformer_blocks.3.attn1.to_q" in label(), label()
    r0 = _rank_in_title(spectrum())
    assert num.input_value() == str(r0)

    # 300 is beyond this layer's 256 inputs: refused, and the box shows the rank the plot shows
    num.fill("300")
    page.locator("#energy").click()
    _wait_for(lambda: "outside" in _status(page), "a status saying 300 is out of range")
    _wait_for(lambda: num.input_value() == str(_rank_in_title(spectrum())), "the rank box to agree with the plot")
    assert _rank_in_title(spectrum()) == r0 and num.input_value() == str(r0)

    # an in-range rank typed into the box redraws when the box loses focus
    num.fill("100")
    page.locator("#energy").click()
    _wait_for(lambda: _rank_in_title(spectrum()) == 100, "the spectrum at r = 100")
    assert "top 100 of 256" in page.locator("#energy").inner_text()

    # tabs opened now show the same layer and rank
    page.get_by_role("tab", name="Outliers").click()
    _wait_for(lambda: _plot_title(page, "plot-outliers").startswith("b3.attn1.to_q:")
              and "r = 100" in _plot_title(page, "plot-outliers"), "the outliers of b3.attn1.to_q at r = 100")
    page.get_by_role("tab", name="Error vs rank").click()
    _wait_for(lambda: _plot_title(page, "plot-error").startswith("b3.attn1.to_q:")
              and "r = 100" in _plot_title(page, "plot-error"), "the error curve of b3.attn1.to_q at r = 100")
    page.get_by_label("extra 16-bit FLOPs / token").check()
    _wait_for(lambda: "16-bit FLOPs/token (r = 100)" in _plot_title(page, "plot-error"), "the error against FLOPs")
    page.get_by_role("tab", name="One group").click()
    _wait_for(lambda: _plot_title(page, "plot-group").startswith("b3.attn1.to_q: token"), "one token group")
    assert "no planted outlier" in _plot_title(page, "plot-group")
    page.locator("#group-plant input[type=number]").fill("50")
    page.locator("#group-token input").click()  # the box loses focus: the slider's release
    _wait_for(lambda: "50× the token's RMS" in _plot_title(page, "plot-group"), "the planted outlier")

    # a wider layer accepts 300 (ff.net.2 reads the 1024-wide hidden layer)
    page.get_by_role("tab", name="Spectrum").click()
    page.locator("#layer-type input").click()
    page.get_by_role("option", name="ff.net.2", exact=True).click()
    _wait_for(lambda: spectrum().startswith("b3.ff.net.2:"), "the spectrum of b3.ff.net.2")
    num.fill("300")
    page.locator("#energy").click()
    _wait_for(lambda: _rank_in_title(spectrum()) == 300, "the spectrum of ff.net.2 at r = 300")
    assert num.input_value() == "300"

    # a rank edited in the plan table recomputes that row's "energy %"
    page.get_by_role("tab", name="Rank plan").click()
    rank_cell = page.locator("#plan-table [data-testid='cell-0-3']")
    energy_cell = page.locator("#plan-table [data-testid='cell-0-4']")
    rank_cell.wait_for(timeout=10_000)
    before = float(energy_cell.inner_text().split()[0])
    assert int(rank_cell.inner_text().split()[0]) < 100
    rank_cell.dblclick()
    page.keyboard.press("Control+A")
    page.keyboard.type("100")
    page.keyboard.press("Enter")
    _wait_for(lambda: float(energy_cell.inner_text().split()[0]) > before, "the energy column to follow the edit")

    # the window resized while the Spectrum tab was hidden (and its plot up to date, so not redrawn): shown
    # again, the plot takes the width it has at 1920 px, and again at 1280 px
    for width, height in ((1920, 1080), (1280, 800)):
        page.get_by_role("tab", name="Rank plan").click()
        page.set_viewport_size({"width": width, "height": height})
        time.sleep(1.0)
        page.get_by_role("tab", name="Spectrum").click()
        _wait_for(lambda: plot_fits(page, "plot-spectrum"), f"the spectrum as wide as its place at {width} px")
    page.close()
