"""One user's explorer session and the plain-Python pieces the handlers are built from.

A `Session` holds what one run produced (the trace from the expensive `encode`, the unedited
prediction, the ranked concepts) and the user's edits; toggling a concept reruns `decode` only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from segcompass.concepts import ConceptInfo
from segcompass.records import ConceptEdit, Prediction, TokenRole, Trace
from segcompass.repair import REWRITE_MARK

MAX_IMAGE_SIDE = 768  # larger uploads are downscaled: the model sees 256 px, overlays stay light
HIDDEN_TOKENS = {"<eos>", "<pad>", "<|endoftext|>", "<|im_end|>"}


@dataclass
class Session:
    """Everything one user's explorer holds between events (kept in gr.State, one per browser tab)."""

    image: np.ndarray  # [H, W, 3] uint8, the image the model saw (after downscaling)
    scale: float  # session-image pixels per uploaded-image pixel (clicks arrive in uploaded pixels)
    trace: Trace
    base: Prediction
    concepts: list[ConceptInfo]
    cot_positions: list[int]  # sequence position of each token shown in the CoT panel
    edits: list[ConceptEdit] = field(default_factory=list)
    edited: Prediction | None = None  # decode(trace, edits), None while there are no edits
    reasoned: Trace | None = None  # the re-reasoned trace ("Re-reason with these edits")
    reasoned_pred: Prediction | None = None
    reasoned_edits: list[ConceptEdit] = field(default_factory=list)
    image_file: str | None = None  # `image` as a PNG under the temp dir (the overlays' base image)
    patch_box: tuple[float, float, float, float] | None = None  # last clicked patch, session-image pixels

    @property
    def current(self) -> Prediction:
        """The prediction the user is looking at: re-reasoned, else edited, else the original."""
        if self.reasoned_pred is not None and self.reasoned_edits == self.edits:
            return self.reasoned_pred
        return self.edited if self.edited is not None else self.base

    def concept_info(self, concept: int) -> ConceptInfo | None:
        return next((c for c in self.concepts if c.concept == concept), None)


def save_png(image: np.ndarray) -> str:
    """Write an image once as a PNG under the temp dir (where gradio may serve it from); returns the path."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="segcompass-", suffix=".png")
    with open(fd, "wb") as f:
        Image.fromarray(image).save(f, format="PNG", compress_level=1)
    return path


def downscale(image: np.ndarray, max_side: int = MAX_IMAGE_SIDE) -> tuple[np.ndarray, float]:
    """(image with its longest side at most max_side, scale factor applied)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, 1.0
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), s


# ---- streaming a blocking model call ------------------------------------------------------------
class Cancelled(Exception):
    """Raised inside the model's token callback when the listener has gone away."""


@dataclass
class Done:
    value: Any


def stream_tokens(call: Callable[[Callable[[str], None]], Any]) -> Iterator[list[str] | Done]:
    """Run `call(on_token)` in a worker thread; yield lists of new token texts as they arrive, then
    `Done(result)`. Errors of the call are re-raised here. Closing the iterator early (the browser
    left) makes the next token callback raise, which stops generation."""
    tokens: queue.Queue = queue.Queue()
    stop = threading.Event()
    out: dict[str, Any] = {}
    end = object()

    def on_token(text: str) -> None:
        if stop.is_set():
            raise Cancelled()
        tokens.put(text)

    def work() -> None:
        try:
            out["value"] = call(on_token)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = err
        finally:
            tokens.put(end)

    worker = threading.Thread(target=work, name="segcompass-stream", daemon=True)
    worker.start()
    try:
        finished = False
        while not finished:
            batch = [tokens.get()]
            while True:  # drain what has piled up: one UI update per burst, not per token
                try:
                    batch.append(tokens.get_nowait())
                except queue.Empty:
                    break
            finished = batch[-1] is end
            texts = [t for t in batch if t is not end]
            if texts:
                yield texts
        worker.join()
    finally:
        stop.set()
    if "error" in out:
        raise out["error"]
    yield Done(out["value"])


# ---- what the panels show -----------------------------------------------------------------------
def token_piece(text: str, word_level: bool) -> str | None:
    """How one generated token is shown (None: not shown). Word-level tokenizers need spaces."""
    if text in HIDDEN_TOKENS:
        return None
    return text + " " if word_level else text


def add_streamed(streamed: list[str], texts: list[str], word_level: bool) -> bool:
    """Append the shown pieces of streamed token texts to `streamed`; a rewrite mark (segcompass.repair: the CoT is
    written again from its start) clears what came before it. True when the CoT is being rewritten."""
    rewriting = False
    for text in texts:
        if text == REWRITE_MARK:
            streamed.clear()
            rewriting = True
        elif (piece := token_piece(text, word_level)) is not None:
            streamed.append(piece)
    return rewriting


def cot_display(trace: Trace, word_level: bool) -> tuple[list[str], list[int]]:
    """(pieces, positions) of the generated tokens shown in the CoT panel."""
    pieces, positions = [], []
    for pos in range(trace.prompt_length, len(trace.tokens)):
        piece = token_piece(trace.tokens[pos], word_level)
        if piece is not None:
            pieces.append(piece)
            positions.append(pos)
    return pieces, positions


def token_name(trace: Trace, pos: int, grid: int) -> str:
    """A short name for a sequence position: the token text, or `patch (row, col)` for a visual token."""
    if int(trace.roles[pos]) == TokenRole.VISUAL:
        v = int((trace.roles[:pos] == TokenRole.VISUAL).sum())
        return f"patch ({v // grid},{v % grid})"
    return repr(trace.tokens[pos].strip() or trace.tokens[pos])


def edit_status(edits: list[ConceptEdit], concept: int) -> str:
    parts = []
    for e in edits:
        if e.concept != concept:
            continue
        what = "off" if e.op == "zero" else (f"×{e.value:g}" if e.op == "scale" else f"={e.value:g}")
        where = "patch" if e.region is not None else ("" if e.scope == "all" else e.scope)
        parts.append(f"{what} ({where})" if where else what)
    return ", ".join(parts) or "on"


def toggled(edits: list[ConceptEdit], concept: int, op: str, value: float, scope: str,
            region: tuple[float, float, float, float] | None = None) -> list[ConceptEdit]:
    """The edit list after a click on `concept`: remove its edit for this scope (and region) if there
    is one, otherwise add one (switch off, or scale by `value`)."""
    same = [e for e in edits if e.concept == concept and e.scope == scope and e.region == region]
    if same:
        return [e for e in edits if e not in same]
    if op == "scale":
        edit = ConceptEdit(concept=concept, op="scale", value=float(value), scope=scope, region=region)
    else:
        edit = ConceptEdit(concept=concept, op="zero", scope=scope, region=region)
    return [*edits, edit]


def first_divergence(a: list[str], b: list[str]) -> int | None:
    """Index of the first differing token of two token lists, None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
