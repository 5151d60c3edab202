"""Concept labels in SQLite (through SQLAlchemy), keyed by checkpoint fingerprint.

One row per (checkpoint fingerprint, concept): the automatic label with its score and provenance
(written by `python -m app.autolabel`) and, beside it, a human label typed in the explorer. The
label shown is the human one when there is one. The database runs in WAL mode so the app can read
while an auto-labelling run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event, or_, select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_LABEL_CHARS = 120


def default_labels_db() -> Path:
    """`$SEGCOMPASS_LABELS_DB`, else `cache/labels.sqlite` in the repository (gitignored)."""
    return Path(os.environ.get("SEGCOMPASS_LABELS_DB", REPO_ROOT / "cache" / "labels.sqlite"))


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 of the checkpoint's model.safetensors: labels follow the weights, not the folder name."""
    digest = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Base(DeclarativeBase):
    pass


class CheckpointRow(_Base):
    __tablename__ = "checkpoints"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    preset: Mapped[str] = mapped_column(String(64), default="")
    first_seen: Mapped[str] = mapped_column(String(32))


class LabelRow(_Base):
    __tablename__ = "concept_labels"
    __table_args__ = (UniqueConstraint("fingerprint", "concept"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), ForeignKey("checkpoints.fingerprint"), index=True)
    concept: Mapped[int] = mapped_column(Integer)
    auto_label: Mapped[str | None] = mapped_column(Text, nullable=True)
    auto_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    auto_provenance: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    auto_updated: Mapped[str | None] = mapped_column(String(32), nullable=True)
    human_label: Mapped[str | None] = mapped_column(Text, nullable=True)
    human_updated: Mapped[str | None] = mapped_column(String(32), nullable=True)


@dataclass(frozen=True)
class ConceptLabel:
    concept: int
    auto_label: str | None = None
    auto_score: float | None = None
    provenance: dict | None = None
    human_label: str | None = None

    @property
    def text(self) -> str:
        """What the explorer shows: the human label, else the automatic one, else empty."""
        return self.human_label or self.auto_label or ""

    @property
    def source(self) -> str:
        return "human" if self.human_label else ("auto" if self.auto_label else "")


def _as_label(row: LabelRow) -> ConceptLabel:
    return ConceptLabel(
        concept=row.concept, auto_label=row.auto_label, auto_score=row.auto_score,
        provenance=json.loads(row.auto_provenance) if row.auto_provenance else None, human_label=row.human_label,
    )


class LabelStore:
    """Concept labels of any number of checkpoints in one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.path}")

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_connection, _record):  # every new connection: WAL, wait on locks
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        _Base.metadata.create_all(self.engine)

    def journal_mode(self) -> str:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA journal_mode").scalar()

    def register_checkpoint(self, fingerprint: str, path: str | Path = "", preset: str = "") -> None:
        with Session(self.engine) as s, s.begin():
            if s.get(CheckpointRow, fingerprint) is None:
                s.add(CheckpointRow(fingerprint=fingerprint, path=str(path), preset=preset, first_seen=_now()))

    def _row(self, s: Session, fingerprint: str, concept: int) -> LabelRow:
        row = s.scalar(select(LabelRow).where(LabelRow.fingerprint == fingerprint, LabelRow.concept == concept))
        if row is None:
            if s.get(CheckpointRow, fingerprint) is None:
                s.add(CheckpointRow(fingerprint=fingerprint, path="", preset="", first_seen=_now()))
                s.flush()
            row = LabelRow(fingerprint=fingerprint, concept=concept)
            s.add(row)
        return row

    def set_auto(self, fingerprint: str, labels: list[tuple[int, str, float, dict]]) -> int:
        """Store automatic labels [(concept, label, score, provenance)]; human labels are kept."""
        with Session(self.engine) as s, s.begin():
            for concept, label, score, provenance in labels:
                row = self._row(s, fingerprint, int(concept))
                row.auto_label, row.auto_score = label, float(score)
                row.auto_provenance, row.auto_updated = json.dumps(provenance), _now()
        return len(labels)

    def rename(self, fingerprint: str, concept: int, label: str) -> ConceptLabel:
        """Store a human label beside the automatic one; an empty label removes the human label."""
        label = " ".join(str(label).split())
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"a label has at most {MAX_LABEL_CHARS} characters (got {len(label)})")
        with Session(self.engine) as s, s.begin():
            row = self._row(s, fingerprint, int(concept))
            row.human_label, row.human_updated = (label or None), _now()
            s.flush()
            return _as_label(row)

    def labels(self, fingerprint: str, concepts: list[int] | None = None) -> dict[int, ConceptLabel]:
        query = select(LabelRow).where(LabelRow.fingerprint == fingerprint)
        if concepts is not None:
            query = query.where(LabelRow.concept.in_([int(c) for c in concepts]))
        with Session(self.engine) as s:
            return {row.concept: _as_label(row) for row in s.scalars(query)}

    def get(self, fingerprint: str, concept: int) -> ConceptLabel:
        return self.labels(fingerprint, [concept]).get(int(concept), ConceptLabel(concept=int(concept)))

    def search(self, fingerprint: str, text: str, limit: int = 50) -> list[ConceptLabel]:
        """Concepts whose human or automatic label contains every word of `text` (case-insensitive)."""
        words = text.lower().split()
        if not words:
            return []
        query = select(LabelRow).where(LabelRow.fingerprint == fingerprint)
        for w in words:
            pattern = f"%{w.replace('%', '').replace('_', '')}%"
            query = query.where(or_(LabelRow.human_label.ilike(pattern), LabelRow.auto_label.ilike(pattern)))
        query = query.order_by(LabelRow.auto_score.desc().nulls_last(), LabelRow.concept).limit(limit)
        with Session(self.engine) as s:
            return [_as_label(row) for row in s.scalars(query)]

    def close(self) -> None:
        self.engine.dispose()
