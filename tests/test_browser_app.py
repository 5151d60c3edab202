"""End to end in headless Debian Chromium (Playwright, no browser download): run an example and watch
the CoT stream, click a token and a patch, switch a concept off and see the mask change, rename
the concept, export and download the zip. Saves test-results/explorer.png. No request may leave
127.0.0.1.

CI installs the browser with `apt-get install -y chromium`; without it this test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_app import app_checkpoint, explorer  # noqa: F401 - shared fixtures
from tests.test_app_api import serve

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
]
RESULTS = Path(__file__).resolve().parent.parent / "test-results"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

# Watches the CoT panel: records (characters shown, tokens shaded by a concept) at every DOM change.
WATCH_COT = """() => {
  window.__cot = [];
  const el = document.querySelector('#cot-tokens');
  new MutationObserver(() => window.__cot.push([el.innerText.trim().length,
      el.querySelectorAll('.highlighted').length])).observe(el, {subtree: true, childList: true,
      characterData: true, attributes: true});
}"""


def most_mask_changing_concept(explorer, example, rows: int = 8):  # noqa: F811
    """(row, concept, pixels) of the listed concept, among the first `rows` (the table renders only the
    rows in view), whose switch-off changes the mask most. The app is deterministic (greedy CoT)."""
    from segcompass.concepts import toggle_effects, top_concepts
    from segcompass.vision import to_rgb_array

    from app.session import downscale
    from app.ui import TOP_CONCEPTS

    image, _ = downscale(to_rgb_array(example["image"]))
    trace = explorer.model.encode(image, example["instruction"])
    listed = top_concepts(explorer.model, trace, limit=TOP_CONCEPTS)[:rows]
    changes = toggle_effects(explorer.model, trace, [c.concept for c in listed])
    row = int(np.argmax(changes))
    return row, listed[row].concept, changes[row]


@pytest.fixture(scope="module")
def app_url(explorer):  # noqa: F811
    demo, url = serve(explorer)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser_page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)  # generous: the cores are shared with training runs
        page.requests = []
        page.on("request", lambda r: page.requests.append(r.url))
        page.goto(app_url)
        page.wait_for_selector("#run-btn")  # (the heartbeat stream keeps the network busy)
        yield page
        browser.close()


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_explorer_in_chromium(browser_page, app_url, explorer, tmp_path):  # noqa: F811
    page = browser_page
    # The example (among the table rows rendered) whose listed concept moves the mask most.
    page.wait_for_selector("#examples tbody tr")
    shown = page.locator("#examples tbody tr").count()
    picks = [(most_mask_changing_concept(explorer, e), i) for i, e in enumerate(explorer.examples[:shown])]
    (row, concept, _), index = max(picks, key=lambda p: p[0][2])
    example = explorer.examples[index]

    # Run an example; the CoT streams in unshaded, then every token is shaded by its strongest concept.
    page.locator("#examples tbody tr").nth(index).click()
    wanted = json.dumps(example["instruction"])
    page.wait_for_function(f"document.querySelector('#instruction textarea').value === {wanted}")
    page.evaluate(WATCH_COT)
    page.click("#run-btn")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done')")
    states = page.evaluate("window.__cot")
    assert any(chars > 0 and shaded == 0 for chars, shaded in states), f"no streamed partial seen: {states[:20]}"
    assert states[-1][1] > 0
    assert page.locator("#cot-text textarea").input_value()
    assert page.locator("#pred-before img").count() >= 1

    # Clicking a token lists its concepts; clicking the image lists the concepts at that patch.
    page.locator("#cot-tokens .token").nth(2).click()
    page.wait_for_function("document.querySelectorAll('#token-concepts [role=gridcell]').length > 0")
    # A locator click waits for the image to be visible and stable (the concept table above it may
    # still be re-laying the page out); raw mouse coordinates taken earlier could miss it.
    image = page.locator("#image-in img").first
    box = image.bounding_box()
    image.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.3})
    page.wait_for_function("document.querySelector('#patch-info').innerText.includes('Patch')")

    # Switch the concept off: decode only, the new mask appears beside the old with the change.
    assert page.locator(f'#concept-table [data-testid="cell-{row}-0"]').inner_text().strip() == str(concept)
    page.locator(f'#concept-table [data-testid="cell-{row}-1"]').click()
    page.wait_for_function("document.querySelector('#change').innerText.includes('pixels changed')")
    change = text_of(page, "#change")
    pixels = int(re.search(r"pixels changed (\d+)", change).group(1))
    assert pixels > 0, change
    assert page.locator("#pred-after img").count() >= 1
    assert page.locator("#concept-id input").input_value() == str(concept)

    # Rename it: the label is stored and shown in the concept table.
    page.locator("#rename-label input, #rename-label textarea").first.fill("browser label")
    page.click("#rename-btn")
    page.wait_for_function("document.querySelector('#rename-status').innerText.includes('browser label')")
    page.wait_for_function("document.querySelector('#concept-table').innerText.includes('browser label')")
    assert explorer.store.get(explorer.fingerprint, concept).human_label == "browser label"

    # Export and download the zip.
    page.click("#export-btn")
    page.wait_for_selector("#download-btn", state="visible")
    with page.expect_download() as info:
        page.click("#download-btn")
    saved = tmp_path / "export.zip"
    info.value.save_as(saved)
    with zipfile.ZipFile(saved) as z:
        record = json.loads(z.read("record.json"))
        assert "mask.png" in z.namelist()
    assert record["edits"] == [{"concept": concept, "op": "zero", "value": 0.0, "scope": "all",
                                "token_range": None, "region": None}]
    assert next(c for c in record["concepts"] if c["concept"] == concept)["label"] == "browser label"

    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "explorer.png"), full_page=True)
    shutil.copy(saved, RESULTS / "explorer-export.zip")

    # Nothing left the machine: every request went to the app on 127.0.0.1 (or stayed in the page).
    outside = [u for u in page.requests if not u.startswith((app_url.rstrip("/"), "data:", "blob:"))]
    assert outside == []
