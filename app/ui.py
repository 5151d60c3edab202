"""The explorer: handlers (plain methods, testable without a browser) above the gr.Blocks layout.

Run streams the CoT (the expensive `encode`), then shows slot heatmaps, the mask and the concepts
that drive them; clicking a concept edits it and reruns `decode` only (milliseconds). Each browser
tab has its own `Session` in gr.State; every model event shares one concurrency id, so on two cores
a toggle waits for a stream instead of fighting it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from segcompass.concepts import concepts_at, strongest_concept_per_token, top_concepts, visual_token_at
from segcompass.model import check_instruction
from segcompass.records import TokenRole
from segcompass.vision import to_rgb_array

from .export import export_zip
from .labels import LabelStore
from .render import annotations, change_markdown, compare, concept_colour
from .session import (
    Done, Session, add_streamed, cot_display, downscale, edit_status, first_divergence, save_png, token_name, toggled,
)

log = logging.getLogger(__name__)

MODEL = "model"  # the concurrency id of every event that runs the model
TOP_CONCEPTS = 30
CONCEPT_COLUMNS = ["concept", "label", "contribution", "max act.", "visual", "CoT", "instr.", "fires on", "edit"]
TOKEN_COLUMNS = ["concept", "label", "activation", "edit"]
SEARCH_COLUMNS = ["concept", "label", "source", "auto score", "match", "contribution here"]
REWRITING = "The visual tokens contradict the decision: rewriting…"
MEANING_MIN_COSINE = 0.35  # semantic matches below this cosine are not shown
PATCH_SCOPE = "clicked patch"
MAX_VERIFY_SAMPLES = 8
NO_EDITS = "No edits yet: click a concept (or type its number and press Toggle) to switch it off."


def _empty(columns: list[str]) -> dict:
    return {"headers": columns, "data": []}


class Explorer:
    """The handlers of one explorer app: a model, its checkpoint fingerprint and the label store."""

    def __init__(self, model, store: LabelStore, fingerprint: str, checkpoint: str | Path = "",
                 examples: list[dict] | None = None):
        self.model, self.store, self.fingerprint = model, store, fingerprint
        self.checkpoint = {"path": str(checkpoint), "fingerprint": fingerprint, "preset": model.config.preset}
        self.examples = examples or []
        self.word_level = model.config.lm.kind == "tiny"
        self.grid = model.config.vision.token_grid
        store.register_checkpoint(fingerprint, checkpoint, model.config.preset)

    # ---- helpers ---------------------------------------------------------------------------
    def labels(self, concepts) -> dict:
        return self.store.labels(self.fingerprint, [int(c) for c in concepts])

    def label_text(self, labels: dict, concept: int) -> str:
        return labels[concept].text if concept in labels else ""

    def concept_table(self, s: Session) -> dict:
        labels = self.labels(c.concept for c in s.concepts)
        rows = []
        for c in s.concepts:
            where = ", ".join(token_name(s.trace, p, self.grid) for p in c.top_positions[:4])
            rows.append([c.concept, self.label_text(labels, c.concept), round(c.contribution, 5),
                         round(c.max_activation, 3), c.visual_tokens, c.cot_tokens, c.instruction_tokens, where,
                         edit_status(s.edits, c.concept)])
        return {"headers": CONCEPT_COLUMNS, "data": rows}

    def concept_rows(self, s: Session, pairs: list[tuple[int, float]]) -> dict:
        labels = self.labels(f for f, _ in pairs)
        return {"headers": TOKEN_COLUMNS,
                "data": [[f, self.label_text(labels, f), round(v, 4), edit_status(s.edits, f)] for f, v in pairs]}

    def shaded_tokens(self, s: Session) -> dict:
        """Each generated token shaded by its strongest concept (one colour per concept)."""
        strongest = strongest_concept_per_token(s.trace)
        pieces, _ = cot_display(s.trace, self.word_level)
        value, colours = [], {}
        for piece, pos in zip(pieces, s.cot_positions):
            best = strongest[pos]
            if best is None:
                value.append((piece, None))
                continue
            name = f"#{best[0]}"
            colours[name] = concept_colour(best[0])
            value.append((piece, name))
        return gr.update(value=value, color_map=colours)

    def overlay(self, s: Session, pred) -> dict:
        """An update of an AnnotatedImage. The base image is the PNG written once per run (re-encoding
        it on every toggle cost ~10 ms); gr.update, unlike a component instance, is postprocessed once."""
        value, colours = annotations(s.image_file or s.image, pred)
        return gr.update(value=value, color_map=colours)

    def after_outputs(self, s: Session):
        """(after image, change text, concept table, edits JSON) for the current edits."""
        if not s.edits:
            return None, NO_EDITS, self.concept_table(s), []
        pred = s.current
        text = change_markdown(compare(s.base, pred), len(s.edits))
        if pred is s.reasoned_pred:
            text = "**Re-reasoned** with these edits (new CoT → codes → slots).\n\n" + text
        return self.overlay(s, pred), text, self.concept_table(s), [e.to_dict() for e in s.edits]

    @staticmethod
    def require(s: Session | None) -> Session:
        if s is None:
            raise gr.Error("Run the model on an image first.")
        return s

    # ---- run: the expensive pass, streamed -------------------------------------------------
    def run(self, image, instruction: str, state: Session | None, correct: bool | None = None):
        """Generator. Yields (state, status, cot text, cot tokens, before, after, change, concept
        table, token concepts, patch concepts, edits, re-reasoned cot, re-reason note). `correct`: rewrite a CoT
        whose decision the visual tokens contradict (segcompass.repair; None: as the checkpoint says)."""
        if image is None:
            raise gr.Error("No image: upload one or pick an example.")
        try:
            arr = to_rgb_array(image)
        except ValueError as err:
            raise gr.Error(f"Cannot use this image: {err}") from err
        try:
            instruction = check_instruction(instruction or "")
        except ValueError as err:
            raise gr.Error(f"Instruction: {err}.") from err
        arr, scale = downscale(arr)
        skip = gr.skip()
        streamed: list[str] = []
        rewriting = False
        yield (state, "Reasoning…", "", [], None, None, NO_EDITS, _empty(CONCEPT_COLUMNS),
               _empty(TOKEN_COLUMNS), _empty(TOKEN_COLUMNS), [], "", "")
        for item in self._stream(lambda on_token: self.model.encode(arr, instruction, on_token=on_token,
                                                                     repair=correct)):
            if isinstance(item, Done):
                trace = item.value
                break
            rewriting = add_streamed(streamed, item, self.word_level) or rewriting
            yield (skip, f"{REWRITING if rewriting else 'Reasoning…'} {len(streamed)} tokens", "".join(streamed),
                   [(p, None) for p in streamed], *[skip] * 9)
        yield self.session_outputs(arr, scale, trace)

    def session_outputs(self, arr, scale: float, trace, note: str = "") -> tuple:
        """A new Session for a finished trace: the 13 outputs of `run`, edits cleared."""
        pred = self.model.decode(trace)
        concepts = top_concepts(self.model, trace, limit=TOP_CONCEPTS)
        _, positions = cot_display(trace, self.word_level)
        s = Session(image=arr, scale=scale, trace=trace, base=pred, concepts=concepts, cot_positions=positions,
                    image_file=save_png(arr))
        status = (f"Done: {len(positions)} CoT tokens, {len(concepts)} concepts shown, "
                  f"slots kept {[k + 1 for k in pred.kept_slots]}, mask {int(pred.mask.sum())} px"
                  + ("" if trace.ref_found else " · no reference token emitted (last token stands in)")
                  + (f" · rewritten: {trace.repair}" if trace.repair else "") + note)
        return (s, status, trace.cot or trace.completion, self.shaded_tokens(s), self.overlay(s, pred), None,
                NO_EDITS, self.concept_table(s), _empty(TOKEN_COLUMNS), _empty(TOKEN_COLUMNS), [], "", "")

    # ---- verify: sample more chains of thought, keep the best-supported ----------------------
    def verify(self, state: Session | None, samples):
        """Sample `samples` more CoTs for the session's image and instruction and keep the one whose claims
        the model's own visual tokens support best (`segcompass.verify.best_of`). Returns the 13 outputs of
        `run` (a new session, edits cleared, when another CoT is kept; else unchanged) and the candidates'
        scores as Markdown."""
        import torch

        from segcompass.verify import best_of

        s = self.require(state)
        try:
            n = int(samples)
        except (TypeError, ValueError):
            n = 0
        if not 1 <= n <= MAX_VERIFY_SAMPLES:
            raise gr.Error(f"Samples: a whole number from 1 to {MAX_VERIFY_SAMPLES}.")
        kept, cands = best_of(self.model, s.image, s.trace.instruction, n, generator=torch.Generator().manual_seed(0))
        table = verify_markdown(cands)
        if kept.cot == s.trace.cot:
            return (s, *[gr.skip()] * 12, "Kept the original chain of thought.\n\n" + table)
        out = self.session_outputs(s.image, s.scale, kept, " · chain of thought replaced by the best-supported sample")
        return (*out, "Kept another chain of thought: the image supports its claims better.\n\n" + table)

    def _stream(self, call):
        from .session import stream_tokens

        try:
            yield from stream_tokens(call)
        except ValueError as err:  # the model's own input checks
            raise gr.Error(str(err)) from err

    # ---- edits: decode only -----------------------------------------------------------------
    def toggle(self, state: Session | None, concept, op: str = "switch off", value: float = 0.0,
               scope: str = "all"):
        """Switch a concept off (or scale it) — or undo that — and rerun decode only.
        Returns (state, after image, change text, concept table, edits, concept id)."""
        s = self.require(state)
        try:
            concept = int(concept)
        except (TypeError, ValueError):
            raise gr.Error("Pick a concept: click a row of the concept table or type its number.") from None
        if not 0 <= concept < s.trace.d_sae:
            raise gr.Error(f"Concept {concept} does not exist (this model has {s.trace.d_sae}).")
        region = None
        if scope == PATCH_SCOPE:  # only where the clicked patch is: visual tokens overlapping its box
            if s.patch_box is None:
                raise gr.Error("Click the image first to pick the patch this edit applies to.")
            scope, region = "visual", s.patch_box
        s.edits = toggled(s.edits, concept, "scale" if op == "scale" else "zero", float(value or 0.0),
                          scope or "all", region)
        s.edited = self.model.decode(s.trace, s.edits) if s.edits else None
        return (s, *self.after_outputs(s), concept)

    def select_concept(self, state: Session | None, op: str, value: float, scope: str, evt: gr.SelectData):
        """A click on any row of a concept table toggles that row's concept."""
        row = evt.row_value if evt.row_value is not None else []
        if not row:
            raise gr.Error("Click a row of a concept table.")
        return self.toggle(state, row[0], op, value, scope)

    def reset(self, state: Session | None):
        s = self.require(state)
        s.edits, s.edited = [], None
        return (s, *self.after_outputs(s))

    # ---- the slow path: re-reason with the edits --------------------------------------------
    def reason(self, state: Session | None, correct: bool | None = None):
        """Generator. Yields (state, re-reasoned cot, note, after image, change text, concept table, edits)."""
        s = self.require(state)
        if not s.edits:
            raise gr.Error("Add at least one edit first: re-reasoning without edits reproduces the same CoT.")
        edits = list(s.edits)
        skip = gr.skip()
        streamed: list[str] = []
        rewriting = False
        yield skip, "", "Re-reasoning with the edits spliced into layer L…", *[skip] * 4
        for item in self._stream(lambda on_token: self.model.reason(s.image, s.trace, edits, on_token=on_token,
                                                                     repair=correct)):
            if isinstance(item, Done):
                new = item.value
                break
            rewriting = add_streamed(streamed, item, self.word_level) or rewriting
            yield skip, "".join(streamed), f"{REWRITING if rewriting else 'Re-reasoning…'} {len(streamed)} tokens", \
                *[skip] * 4
        s.reasoned, s.reasoned_edits = new, edits
        s.reasoned_pred = self.model.decode(new, edits)
        old_cot = [p for p in cot_display(s.trace, self.word_level)[0]]
        new_cot = [p for p in cot_display(new, self.word_level)[0]]
        at = first_divergence(old_cot, new_cot)
        note = ("The CoT is unchanged by these edits." if at is None else
                f"The CoT changed from token {at + 1} on ({len(old_cot)} → {len(new_cot)} tokens).")
        if new.repair:
            note += f" Rewritten where the visual tokens contradicted it: {new.repair}."
        return_values = (s, new.cot or new.completion, note, *self.after_outputs(s))
        yield return_values

    # ---- looking: tokens and patches ----------------------------------------------------------
    def token_concepts(self, state: Session | None, index: int):
        """Concepts of the index-th token shown in the CoT panel."""
        s = self.require(state)
        if not 0 <= int(index) < len(s.cot_positions):
            raise gr.Error("Click a token of the chain of thought.")
        pos = s.cot_positions[int(index)]
        return self.concept_rows(s, concepts_at(s.trace, pos, limit=16))

    def select_token(self, state: Session | None, evt: gr.SelectData):
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return self.token_concepts(state, index)

    def patch_concepts(self, state: Session | None, x: float, y: float):
        """(state, patch description, concepts) at pixel (x, y) of the uploaded image. The patch is
        remembered for edits "only at the clicked patch"."""
        s = self.require(state)
        xs, ys = float(x) * s.scale, float(y) * s.scale
        pos = visual_token_at(s.trace, xs, ys)
        if pos is None:
            return s, f"({x:.0f}, {y:.0f}) is outside the image.", _empty(TOKEN_COLUMNS)
        v = int((s.trace.roles[:pos] == TokenRole.VISUAL).sum())
        x0, y0, x1, y1 = (float(b) for b in s.trace.patch_boxes[v])
        s.patch_box = (x0 + 0.5, y0 + 0.5, x1 - 0.5, y1 - 0.5)  # strictly inside: this patch only
        box = [round(b / s.scale) for b in (x0, y0, x1, y1)]
        text = f"Patch ({v // self.grid}, {v % self.grid}) around ({x:.0f}, {y:.0f}), box {box}"
        return s, text, self.concept_rows(s, concepts_at(s.trace, pos, limit=16))

    def select_patch(self, state: Session | None, evt: gr.SelectData):
        x, y = evt.index
        return self.patch_concepts(state, x, y)

    # ---- labels -------------------------------------------------------------------------------
    def rename(self, state: Session | None, concept, label: str):
        """Store a human label; returns (status, concept table)."""
        try:
            concept = int(concept)
        except (TypeError, ValueError):
            raise gr.Error("Pick a concept to rename: click a row or type its number.") from None
        if state is not None and not 0 <= concept < state.trace.d_sae:
            raise gr.Error(f"Concept {concept} does not exist (this model has {state.trace.d_sae}).")
        try:
            saved = self.store.rename(self.fingerprint, concept, label or "")
        except ValueError as err:
            raise gr.Error(str(err)) from err
        msg = (f"Concept {concept} is now labelled “{saved.human_label}”." if saved.human_label
               else f"Removed the human label of concept {concept}.")
        return msg, (self.concept_table(state) if state is not None else gr.skip())

    def search(self, state: Session | None, text: str, meaning: bool = False):
        """Concepts whose label contains the words of `text`, or (meaning=True) whose label is close
        to it in all-MiniLM-L6-v2 embedding space."""
        if meaning and (text or "").strip():
            found = self.search_meaning(text)
        else:
            found = [(lab, "words") for lab in self.store.search(self.fingerprint, text or "")]
        contrib = {c.concept: c.contribution for c in state.concepts} if state is not None else {}
        rows = [[lab.concept, lab.text, lab.source, None if lab.auto_score is None else round(lab.auto_score, 3),
                 match, round(contrib[lab.concept], 5) if lab.concept in contrib else ""] for lab, match in found]
        return {"headers": SEARCH_COLUMNS, "data": rows}

    def search_meaning(self, text: str, limit: int = 25) -> list:
        """[(label, "cos 0.71")] by cosine similarity of MiniLM embeddings (label vectors cached)."""
        try:
            from segcompass.backbones.minilm import embed
        except ImportError as err:
            raise gr.Error(f"Search by meaning needs all-MiniLM-L6-v2: {err}") from err
        labels = [lab for lab in self.store.labels(self.fingerprint).values() if lab.text]
        if not labels:
            return []
        cache = self._embeddings = getattr(self, "_embeddings", {})
        new = sorted({lab.text for lab in labels} - set(cache))
        try:
            if new:
                cache.update(zip(new, embed(new)))
            query = embed([" ".join(text.split())])[0]
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise gr.Error(f"Search by meaning needs all-MiniLM-L6-v2: {err}") from err
        scored = sorted(((float(cache[lab.text] @ query), lab) for lab in labels), key=lambda x: -x[0])
        return [(lab, f"cos {cos:.2f}") for cos, lab in scored[:limit] if cos >= MEANING_MIN_COSINE]

    # ---- export -------------------------------------------------------------------------------
    def export(self, state: Session | None):
        """Zip of the current example; returns (download button, file)."""
        s = self.require(state)
        path = export_zip(s, self.labels(c.concept for c in s.concepts), self.checkpoint)
        return gr.DownloadButton(value=str(path), visible=True), str(path)


def verify_markdown(cands: list[dict]) -> str:
    """The candidates of a verification as a Markdown table: score (log P that all its claims hold), CoT."""
    rows = ["| | support | chain of thought |", "|---|---|---|"]
    for i, c in enumerate(cands):
        score = "no claims" if c["score"] is None else f"{c['score']:.2f}"
        mark = "✓ kept" if c.get("kept") else ""
        name = "greedy" if i == 0 else f"sample {i}"
        rows.append(f"| {name} {mark} | {score} | {c['cot'].replace('|', '/')} |")
    return "\n".join(rows)


def forget(s: Session | None) -> None:
    """When gradio drops a closed tab's state: remove the run's PNG from the temp dir."""
    if isinstance(s, Session) and s.image_file:
        Path(s.image_file).unlink(missing_ok=True)


# ---- layout --------------------------------------------------------------------------------------
CSS = """
#cot-tokens { max-height: 240px; overflow-y: auto; }
#concept-table { max-height: 420px; }
"""


def build_demo(explorer: Explorer, max_queue: int = 32) -> gr.Blocks:
    ex = explorer
    with gr.Blocks(title="SegCompass explorer") as demo:
        gr.Markdown("## SegCompass explorer — watch the reasoning, see the slots, switch concepts on and off",
                    elem_id="title")
        state = gr.State(None, delete_callback=forget)  # one Session per browser tab
        with gr.Row(elem_id="top-row"):
            with gr.Column(scale=1, elem_id="input-col"):
                image = gr.Image(type="filepath", label="Image",
                                 sources=["upload", "clipboard"], height=300, elem_id="image-in")
                instruction = gr.Textbox(label="Instruction", placeholder="e.g. the red circle", lines=2,
                                         max_lines=6, elem_id="instruction")
                correct = gr.Checkbox(
                    value=ex.model.config.lm.repair, elem_id="repair",
                    label="Let the visual tokens correct the decision (rewrite the chain of thought where what they "
                          "see contradicts its extreme, relation, absence or answer)")
                run = gr.Button("Run", variant="primary", elem_id="run-btn")
                if ex.examples:
                    gr.Examples([[e["image"], e["instruction"]] for e in ex.examples], inputs=[image, instruction],
                                label="Examples", examples_per_page=5, elem_id="examples")
                status = gr.Markdown("Upload an image or pick an example, then press Run.", elem_id="status")
            with gr.Column(scale=1, elem_id="cot-col"):
                cot_text = gr.Textbox(label="Chain of thought", lines=3, max_lines=8, interactive=False,
                                      elem_id="cot-text")
                cot_tokens = gr.HighlightedText(label="Tokens, shaded by their strongest concept (click one)",
                                                combine_adjacent=False, show_legend=False,
                                                show_inline_category=False, elem_id="cot-tokens")
                token_table = gr.Dataframe(value=_empty(TOKEN_COLUMNS), label="Concepts of the clicked token",
                                           interactive=False, elem_id="token-concepts")
                patch_info = gr.Markdown("After a run, click the image to list the concepts active at that patch.",
                                         elem_id="patch-info")
                patch_table = gr.Dataframe(value=_empty(TOKEN_COLUMNS), label="Concepts at the clicked patch",
                                           interactive=False, elem_id="patch-concepts")
        with gr.Row(elem_id="pred-row"):
            before = gr.AnnotatedImage(label="Prediction (slot heatmaps, confidence, ✓ kept; mask)", format="png",
                                       height=420, elem_id="pred-before")
            after = gr.AnnotatedImage(label="With the edits", format="png", height=420, elem_id="pred-after")
        change = gr.Markdown(NO_EDITS, elem_id="change")
        with gr.Row(elem_id="concept-row"):
            with gr.Column(scale=3):
                concepts = gr.Dataframe(value=_empty(CONCEPT_COLUMNS), interactive=False, wrap=True,
                                        column_widths=["8%", "20%", "10%", "8%", "7%", "6%", "6%", "27%", "8%"],
                                        label="Concepts driving the slots (click a row to switch it off / on)",
                                        elem_id="concept-table")
            with gr.Column(scale=1, elem_id="edit-col"):
                op = gr.Radio(["switch off", "scale"], value="switch off", label="A click does", elem_id="edit-op")
                factor = gr.Slider(-2.0, 4.0, value=0.0, step=0.1, label="Scale factor", elem_id="edit-scale")
                scope = gr.Dropdown(["all", "visual", "instruction", "cot", PATCH_SCOPE], value="all",
                                    label="On which tokens",
                                    elem_id="edit-scope")
                concept_id = gr.Number(label="Concept", precision=0, elem_id="concept-id")
                with gr.Row():
                    toggle = gr.Button("Toggle", elem_id="toggle-btn")
                    reset = gr.Button("Reset edits", elem_id="reset-btn")
                edits_view = gr.JSON(label="Edits", value=[], elem_id="edits")
                label_box = gr.Textbox(label="Label for this concept", max_lines=1, elem_id="rename-label")
                rename = gr.Button("Rename", elem_id="rename-btn")
                label_status = gr.Markdown("", elem_id="rename-status")
        with gr.Row(elem_id="reason-row"):
            with gr.Column():
                reason = gr.Button("Re-reason with these edits (slow)", elem_id="reason-btn")
                reason_note = gr.Markdown("", elem_id="reason-note")
            reason_cot = gr.Textbox(label="Re-reasoned chain of thought", lines=3, interactive=False,
                                    elem_id="reason-cot")
        with gr.Row(elem_id="verify-row"):
            with gr.Column(scale=1):
                verify_n = gr.Slider(1, MAX_VERIFY_SAMPLES, value=6, step=1, label="Samples",
                                     elem_id="verify-samples")
                verify = gr.Button("Check the reasoning against the image (samples more chains of thought; "
                                   "slow: about samples + 1 runs)", elem_id="verify-btn")
            verify_note = gr.Markdown("Sample more chains of thought, each stating places where the model's own "
                                      "visual tokens see the objects, and keep the one whose named objects, "
                                      "relations, extremes and sizes those tokens support best.",
                                      elem_id="verify-note")
        with gr.Row(elem_id="search-row"):
            with gr.Column(scale=1):
                query = gr.Textbox(label="Search concept labels", placeholder="e.g. red", elem_id="search")
                meaning = gr.Checkbox(label="by meaning (MiniLM embeddings)", value=False, elem_id="search-meaning")
            results = gr.Dataframe(value=_empty(SEARCH_COLUMNS), interactive=False, label="Matching concepts",
                                   elem_id="search-results")
        with gr.Row(elem_id="export-row"):
            export = gr.Button("Export annotated example (.zip)", elem_id="export-btn")
            download = gr.DownloadButton("Download zip", visible=False, elem_id="download-btn")
            export_file = gr.File(label="Exported zip", interactive=False, elem_id="export-file")

        # ---- events ----
        model_events = dict(concurrency_id=MODEL, concurrency_limit=1)
        run_outputs = [state, status, cot_text, cot_tokens, before, after, change, concepts, token_table,
                       patch_table, edits_view, reason_cot, reason_note]
        run.click(ex.run, [image, instruction, state, correct], run_outputs, api_name="run", **model_events)
        verify.click(ex.verify, [state, verify_n], [*run_outputs, verify_note], api_name="verify", **model_events)
        after_outputs = [state, after, change, concepts, edits_view]
        # Toggles take milliseconds: no progress overlay (its fade-in/out delayed the new mask on screen,
        # click -> mask loaded ~150 -> ~100 ms p50 in headless Chromium).
        fast = dict(show_progress="hidden")
        toggle.click(ex.toggle, [state, concept_id, op, factor, scope], [*after_outputs, concept_id],
                     api_name="toggle", **model_events, **fast)
        for table in (concepts, token_table, patch_table, results):
            table.select(ex.select_concept, [state, op, factor, scope], [*after_outputs, concept_id],
                         api_visibility="private", **model_events, **fast)
        reset.click(ex.reset, [state], after_outputs, api_name="reset", **model_events, **fast)
        reason.click(ex.reason, [state, correct], [state, reason_cot, reason_note, after, change, concepts, edits_view],
                     api_name="reason", **model_events)
        cot_tokens.select(ex.select_token, [state], [token_table], api_visibility="private")
        image.select(ex.select_patch, [state], [state, patch_info, patch_table], api_visibility="private")
        rename.click(ex.rename, [state, concept_id, label_box], [label_status, concepts], api_name="rename")
        query.submit(ex.search, [state, query, meaning], [results], api_name="search")
        query.change(ex.search, [state, query, meaning], [results], api_visibility="private",
                     trigger_mode="always_last")
        meaning.change(ex.search, [state, query, meaning], [results], api_visibility="private")
        export.click(ex.export, [state], [download, export_file], api_name="export")
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo


def load_explorer(checkpoint: str | Path | None, labels_db: str | Path | None = None) -> Explorer:
    """Load a checkpoint folder (default: the best shipped one) and open the label store."""
    from segcompass.defaults import resolve_checkpoint
    from segcompass.model import SegCompass

    from .examples import load_examples
    from .labels import checkpoint_fingerprint, default_labels_db

    try:
        folder = resolve_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    model = SegCompass.from_pretrained(folder)
    if model.config.lm.kind == "smollm2":  # inference only: fold LoRA into the weights, ~3x faster CoT
        from segcompass.smol import merge_adapters

        merge_adapters(model)
    store = LabelStore(labels_db or default_labels_db())
    log.info("checkpoint %s (%s), labels in %s", folder, model.config.preset, store.path)
    return Explorer(model, store, checkpoint_fingerprint(folder), folder, load_examples())

