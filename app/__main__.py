"""Serve the explorer:  python -m app [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--labels-db PATH]"""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SegCompass explorer (Gradio).")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the best shipped one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--labels-db", default=None, help="concept label SQLite file (default: cache/labels.sqlite)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores, 2 threads made decode 100x slower)")
    parser.add_argument("--max-queue", type=int, default=32, help="waiting requests before new ones are refused")
    args = parser.parse_args(argv)
    # Offline: no version check, no telemetry, no Hub lookups; launch() checks its own URL directly.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from .serve import launch_local
    from .ui import CSS, build_demo, load_explorer

    from segcompass.checkpoint import CheckpointError

    torch.set_num_threads(max(1, args.threads))
    try:
        explorer = load_explorer(args.checkpoint, args.labels_db)
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    demo = build_demo(explorer, max_queue=args.max_queue)
    logging.getLogger("app").info("serving the explorer on http://%s:%d", args.host, args.port)
    launch_local(demo, args.host, args.port, quiet=True, css=CSS)


if __name__ == "__main__":
    main()
