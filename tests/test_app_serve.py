"""The explorer's launcher survives Gradio's start-up self-check timing out on a busy machine, and says so when it
keeps failing."""

from __future__ import annotations

import gradio as gr
import httpx
import pytest

from app.serve import launch_local
from tests.test_app_api import free_port


def small_demo():
    with gr.Blocks(analytics_enabled=False) as demo:
        gr.Markdown("hello")
    return demo


def flaky_self_check(monkeypatch, failures: int) -> list:
    """Make `gradio.networking.url_ok` report 'not reachable' `failures` times, as a timed-out HEAD does."""
    import gradio.networking as networking

    real, calls = networking.url_ok, []

    def url_ok(url):
        calls.append(url)
        return False if len(calls) <= failures else real(url)

    monkeypatch.setattr(networking, "url_ok", url_ok)
    return calls


def test_a_timed_out_self_check_is_retried_and_the_app_serves(monkeypatch):
    calls = flaky_self_check(monkeypatch, failures=1)
    demo, port = small_demo(), free_port()
    launch_local(demo, "127.0.0.1", port, quiet=True, prevent_thread_lock=True)
    try:
        assert len(calls) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200
    finally:
        demo.close()


def test_a_self_check_that_keeps_failing_gives_a_clear_error_and_frees_the_port(monkeypatch):
    calls = flaky_self_check(monkeypatch, failures=99)
    demo, port = small_demo(), free_port()
    with pytest.raises(RuntimeError, match="did not answer its own start-up check"):
        launch_local(demo, "127.0.0.1", port, attempts=2, quiet=True, prevent_thread_lock=True)
    assert len(calls) == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
