"""Start the Gradio server, surviving its start-up self-check on a loaded machine.

`Blocks.launch` HEADs its own URL with a 3-second timeout (`gradio.networking.url_ok`) and, when that times out,
raises "When localhost is not accessible, a shareable link must be created". On 2 cores busy with training the
first page render can take longer than that although the server is up and reachable (seen in session 20's CI run,
with a training job beside it). We close the half-started server and launch again, a few times, before giving up
with an error that says what happened.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

SELF_CHECK_FAILED = "localhost is not accessible"


def launch_local(demo, host: str, port: int, attempts: int = 3, **launch_kwargs) -> None:
    """`demo.launch(server_name=host, server_port=port, share=False, ...)`, retried if only the self-check failed."""
    for attempt in range(1, attempts + 1):
        try:
            demo.launch(server_name=host, server_port=port, share=False, **launch_kwargs)
            return
        except ValueError as err:
            if SELF_CHECK_FAILED not in str(err):
                raise
            demo.close()
            if attempt == attempts:
                raise RuntimeError(
                    f"the explorer's server on http://{host}:{port}/ did not answer its own start-up check "
                    f"(3 s, {attempts} tries); the machine may be too busy, or a proxy intercepts localhost "
                    "(set NO_PROXY=127.0.0.1,localhost)") from err
            log.warning("start-up self-check of http://%s:%d/ timed out (try %d of %d); relaunching",
                        host, port, attempt, attempts)
            time.sleep(1.0)
