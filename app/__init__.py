"""SegCompass explorer (Gradio): watch the reasoning, see the slots, switch concepts on and off.

    python -m app [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--labels-db PATH]
    python -m app.autolabel --checkpoint DIR --data data/shapeworld --split val --limit 200
    python -m app.examples          # regenerate assets/examples/
    python -m bench.bench_app       # latency: first CoT token, run, toggle (p50/p95)

Modules: `ui` (handlers above the layout), `session` (one tab's state, streaming), `render`
(overlays, before/after change), `labels` (SQLite concept labels), `export` (zip + ReasonSeg pair),
`autolabel` (labels from ShapeWorld scans), `examples` (bundled examples).
"""
