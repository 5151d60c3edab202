"""The explorer served in-process and driven through its API with gradio_client: run (streamed
partials), toggle, reset, rename + search, export; two clients keep separate sessions."""

from __future__ import annotations

import json
import socket
import zipfile

import pytest

from tests.test_app import app_checkpoint, explorer  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(explorer):  # noqa: F811
    """Launch the explorer on a free loopback port; returns (demo, url)."""
    from app.serve import launch_local
    from app.ui import CSS, build_demo

    demo = build_demo(explorer)
    port = free_port()
    launch_local(demo, "127.0.0.1", port, quiet=True, prevent_thread_lock=True, css=CSS)
    return demo, f"http://127.0.0.1:{port}/"


CONNECTIONS: list = []  # every address a socket of this process connected to while the app ran


@pytest.fixture(scope="module")
def served(explorer):  # noqa: F811
    import socket

    real_connect = socket.socket.connect

    def recording_connect(sock, address):
        CONNECTIONS.append(address)
        return real_connect(sock, address)

    socket.socket.connect = recording_connect
    try:
        demo, url = serve(explorer)
        yield url
        demo.close()
    finally:
        socket.socket.connect = real_connect


@pytest.fixture
def client(served, tmp_path):
    from gradio_client import Client

    return Client(served, analytics_enabled=False, verbose=False, download_files=str(tmp_path))


def value(output):
    """A component returned with new props reaches the client as an update dict."""
    return output.get("value") if isinstance(output, dict) and "color_map" in output else output


def run(client, example):
    from gradio_client import handle_file

    job = client.submit(handle_file(example["image"]), example["instruction"], api_name="/run")
    job.result(timeout=60)
    return job.outputs()


def test_api_run_streams_partials_then_the_result(client, explorer):  # noqa: F811
    outs = run(client, explorer.examples[0])
    assert len(outs) >= 3  # cleared, streamed tokens, final
    status, cot_text, tokens = outs[-1][0], outs[-1][1], outs[-1][2]
    assert status.startswith("Done") and cot_text
    streamed = [o for o in outs if str(o[0]).startswith("Reasoning…") and o[1]]
    assert streamed, "no streamed partial carried CoT text"
    assert len(streamed[0][1]) <= len(cot_text) + 1
    assert value(outs[-1][2])[0]["token"]
    before = value(outs[-1][3])
    assert before["image"] and len(before["annotations"]) == explorer.model.config.codebook.num_slots + 1
    concepts = outs[-1][6]
    assert concepts["headers"][0] == "concept" and concepts["data"]


def test_api_toggle_reset_label_and_export(client, explorer, tmp_path):  # noqa: F811
    outs = run(client, explorer.examples[1])
    concept = outs[-1][6]["data"][0][0]
    after, change, table, edits, cid = client.predict(concept, "switch off", 0.0, "all", api_name="/toggle")
    assert cid == concept and edits == [{"concept": concept, "op": "zero", "value": 0.0, "scope": "all",
                                         "token_range": None, "region": None}]
    assert "pixels changed" in change and value(after)["annotations"]
    assert dict((r[0], r[-1]) for r in table["data"])[concept] == "off"
    after, change, table, edits, cid = client.predict(concept + 0, "scale", 2.0, "all", api_name="/toggle")
    assert edits == []  # the same concept and scope again: the edit is undone
    client.predict(concept, "scale", 2.0, "visual", api_name="/toggle")
    status, table = client.predict(concept, "api label", api_name="/rename")
    assert "api label" in status and dict((r[0], r[1]) for r in table["data"])[concept] == "api label"
    found = client.predict("api label", False, api_name="/search")
    assert [r[0] for r in found["data"]] == [concept]
    download, path = client.predict(api_name="/export")
    with zipfile.ZipFile(path) as z:
        record = json.loads(z.read("record.json"))
    assert record["edits"][0]["op"] == "scale" and record["edits"][0]["scope"] == "visual"
    assert record["instruction"] == explorer.examples[1]["instruction"]
    after, change, table, edits = client.predict(api_name="/reset")
    assert edits == [] and after is None


def test_api_errors_are_clear_and_sessions_are_separate(served, explorer, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    a = Client(served, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "a"))
    b = Client(served, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "b"))
    with pytest.raises(Exception, match="Run the model"):
        b.predict(3, "switch off", 0.0, "all", api_name="/toggle")
    with pytest.raises(Exception, match="empty"):
        a.predict(handle_file(explorer.examples[0]["image"]), "  ", api_name="/run")
    ja = a.submit(handle_file(explorer.examples[2]["image"]), "every diamond", api_name="/run")
    jb = b.submit(handle_file(explorer.examples[3]["image"]), "the medium star", api_name="/run")
    ja.result(timeout=60), jb.result(timeout=60)
    concept = ja.outputs()[-1][6]["data"][0][0]
    a.predict(concept, "switch off", 0.0, "all", api_name="/toggle")
    _, path_a = a.predict(api_name="/export")
    _, path_b = b.predict(api_name="/export")
    with zipfile.ZipFile(path_a) as za, zipfile.ZipFile(path_b) as zb:
        ra, rb = json.loads(za.read("record.json")), json.loads(zb.read("record.json"))
    assert (ra["instruction"], len(ra["edits"])) == ("every diamond", 1)
    assert (rb["instruction"], rb["edits"]) == ("the medium star", [])


def test_server_side_never_connects_outside_loopback(served, client, explorer):  # noqa: F811
    """Analytics off, offline hub: the app process itself only talks to 127.0.0.1 (after runs above)."""
    run(client, explorer.examples[0])
    inet = [a for a in CONNECTIONS if isinstance(a, tuple)]
    assert inet, "no connection recorded at all: the guard is not working"
    assert all(a[0] in ("127.0.0.1", "::1", "localhost") for a in inet), inet
