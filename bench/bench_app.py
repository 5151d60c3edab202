"""Explorer latency (a benchmark, not a test):

    python -m bench.bench_app [--checkpoint DIR] [--n 30] [--threads 1] [--no-api] [--browser] [--no-repair]

On the bundled examples, measures
- time to first CoT token (encode, from the call to the first streamed token),
- a full run as the Run button does it (encode + decode + concept ranking + panels),
- a toggle as the concept click does it (decode only + change + panels), and decode alone,
- with the API (default on): the same toggle and run through a served app and gradio_client, so
  gradio's own work (overlay PNGs, queue, HTTP) is included, next to a trivial endpoint (label
  search) as the floor of a gradio round trip,
- with --browser: in headless Chromium, from the click on a concept row to the new mask image
  loaded in the "with the edits" panel (what a user waits for),
and prints p50 / p95 in milliseconds. Without a shipped checkpoint it benchmarks an untrained tiny
model and says so.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from segcompass.predict import add_inference_switches


def pct(times: list[float]) -> str:
    a = np.array(times) * 1000
    return f"p50 {np.percentile(a, 50):8.1f} ms   p95 {np.percentile(a, 95):8.1f} ms   (n={len(a)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--n", type=int, default=30, help="measurements per quantity")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-api", action="store_true", help="skip the served-app measurements")
    parser.add_argument("--browser", action="store_true", help="also measure click-to-mask in headless Chromium")
    add_inference_switches(parser)
    args = parser.parse_args(argv)
    for key, value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"),
                       ("NO_PROXY", "127.0.0.1,localhost")):
        os.environ.setdefault(key, value)

    import torch

    from segcompass.defaults import default_checkpoint
    from segcompass.vision import to_rgb_array

    from app.examples import load_examples
    from app.labels import LabelStore
    from app.session import downscale
    from app.ui import load_explorer

    torch.set_num_threads(max(1, args.threads))
    folder = args.checkpoint or default_checkpoint()
    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    note = ""
    if folder is None:
        from segcompass.build import build_model

        torch.manual_seed(0)
        folder = tmp / "tiny-untrained"
        build_model("tiny").eval().save_pretrained(folder)
        note = " (no shipped checkpoint: UNTRAINED tiny)"
    ex = load_explorer(folder, tmp / "labels.sqlite")
    model = ex.model
    model.config = model.config.inference(args.ground_regions, args.repair)
    examples = load_examples()
    print(f"checkpoint {folder}{note}; preset {model.config.preset}; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}; ground_regions {model.config.lm.ground_regions}, "
          f"repair {model.config.lm.repair}")

    first, runs, toggles, decodes = [], [], [], []
    sessions = []
    for i in range(args.n):
        e = examples[i % len(examples)]
        image, _ = downscale(to_rgb_array(e["image"]))
        t0 = time.perf_counter()
        seen: list[float] = []
        model.encode(image, e["instruction"], on_token=lambda _t: seen or seen.append(time.perf_counter()))
        first.append(seen[0] - t0)
        t0 = time.perf_counter()
        outs = list(ex.run(e["image"], e["instruction"], None))
        runs.append(time.perf_counter() - t0)
        sessions.append(outs[-1][0])
    for i in range(args.n):
        s = sessions[i % len(sessions)]
        concept = s.concepts[i % min(5, len(s.concepts))].concept
        s.edits, s.edited = [], None
        t0 = time.perf_counter()
        ex.toggle(s, concept)
        toggles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.decode(s.trace, s.edits)
        decodes.append(time.perf_counter() - t0)
    print(f"time to first CoT token      {pct(first)}")
    print(f"full run (Run button)        {pct(runs)}")
    print(f"toggle handler (decode+UI)   {pct(toggles)}")
    print(f"decode alone                 {pct(decodes)}")

    if not args.no_api or args.browser:
        from gradio_client import Client, handle_file

        from app.serve import launch_local
        from app.ui import build_demo
        from tests.test_app_api import free_port

        demo = build_demo(ex)
        port = free_port()
        launch_local(demo, "127.0.0.1", port, quiet=True, prevent_thread_lock=True)
        url = f"http://127.0.0.1:{port}/"
        try:
            if args.browser:
                texts, masks = browser_toggles(url, args.n)
                print(f"browser click -> change text {pct(texts)}")
                print(f"browser click -> new mask    {pct(masks)}")
            if args.no_api:
                return
            client = Client(url, analytics_enabled=False, verbose=False, download_files=False)
            api_runs, api_toggles, api_floor = [], [], []
            for i in range(max(3, args.n // 3)):
                e = examples[i % len(examples)]
                t0 = time.perf_counter()
                client.predict(handle_file(e["image"]), e["instruction"], api_name="/run")
                api_runs.append(time.perf_counter() - t0)
            table = client.predict(0, "switch off", 0.0, "all", api_name="/toggle")[2]  # toggles concept 0
            concepts = [row[0] for row in table["data"][:5]] or [0]
            for i in range(args.n):
                t0 = time.perf_counter()
                client.predict(concepts[i % len(concepts)], "switch off", 0.0, "all", api_name="/toggle")
                api_toggles.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.predict("red", api_name="/search")
                api_floor.append(time.perf_counter() - t0)
            print(f"API full run (gradio_client) {pct(api_runs)}")
            print(f"API toggle -> new mask       {pct(api_toggles)}")
            print(f"API floor (label search)     {pct(api_floor)}")
        finally:
            demo.close()
    LabelStore(tmp / "labels.sqlite").close()


TIMED_CLICK = """() => new Promise((resolve, reject) => {
  // The Markdown's own text (.prose), not the progress tracker's "processing | 0.1s" beside it.
  const change = document.querySelector('#change .prose') || document.querySelector('#change');
  const before = change.innerText;
  const imgs = () => Array.from(document.querySelectorAll('#pred-after img'));
  const srcs = imgs().map(i => i.src).join();
  const t0 = performance.now();
  let text = null;
  const cell = document.querySelector('#concept-table [data-testid="cell-0-1"]');
  for (const type of ['pointerdown', 'mousedown', 'pointerup', 'mouseup', 'click']) {
    cell.dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true, view: window, button: 0}));
  }
  const check = () => {
    const now = imgs();
    if (text === null && change.innerText !== before) { text = performance.now() - t0; }
    if (text !== null && now.map(i => i.src).join() !== srcs && now.every(i => i.complete)) {
      resolve([text, performance.now() - t0]);
    } else if (performance.now() - t0 > 30000) { reject('timeout'); } else { requestAnimationFrame(check); }
  };
  requestAnimationFrame(check);
})"""


def browser_toggles(url: str, n: int) -> tuple[list[float], list[float]]:
    """Click-to-change-text and click-to-new-mask times in headless Chromium: click a concept row,
    wait until the change text is new and the edited overlay's images have loaded."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser_app import ARGS, CHROMIUM

    texts, times = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#run-btn")
        page.locator("#examples tbody tr").nth(0).click()
        page.wait_for_timeout(300)
        page.click("#run-btn")
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done')", timeout=60_000)
        for i in range(n + 2):
            # Timed inside the page (performance.now), so Playwright's own round trips don't count.
            text_ms, mask_ms = page.evaluate(TIMED_CLICK)
            if i >= 2:  # the first toggles warm up
                texts.append(text_ms / 1000)
                times.append(mask_ms / 1000)
        browser.close()
    return texts, times


if __name__ == "__main__":
    main()
