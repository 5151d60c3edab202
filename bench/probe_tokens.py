"""What do the visual tokens know? A linear probe on the vision encoder's token features reads the
colour, shape and size of the object under each token (ShapeWorld `objects`; tokens over no object
are skipped). Trained on the first `--train` train examples, scored on `--split`.

    python -m bench.probe_tokens --checkpoint assets/checkpoints/tiny --data data/sw30k --train 4000

Prints JSON: train and held-out accuracy per attribute. High held-out accuracy with a CoT that
misnames objects (bench.diagnose_cot) means the language model fails to read its visual tokens.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from training.examples import stack_pixels


def _features(model, examples, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            tokens, _ = model.vision(stack_pixels(chunk))
            feats.append(tokens.reshape(-1, tokens.shape[-1]))
            labels.append(torch.stack([e.token_labels[:, :3] for e in chunk]).reshape(-1, 3))
    return torch.cat(feats), torch.cat(labels)


def labelled_examples(data: str, split: str, config, n_train: int) -> tuple[list, list]:
    """The first `n_train` train examples and all of `split`, each with per-token object labels."""
    from training.examples import load_examples

    train = load_examples(data, "train", config, limit=n_train, cache=False)
    held = load_examples(data, split, config, cache=False)
    if any(e.token_labels is None for e in train + held):
        raise SystemExit("the probe needs ShapeWorld `objects` in every example")
    return train, held


def fit_probe(x_train, y_train, x_held, y_held, steps: int = 400) -> tuple[dict, dict]:
    """A linear probe (features standardised on train, full-batch Adam) for colour, shape and size;
    returns (train, held-out) accuracy per attribute. Rows labelled -100 everywhere are dropped."""
    from training.examples import COLOURS, SHAPES, SIZES

    keep_train, keep_held = y_train[:, 0] >= 0, y_held[:, 0] >= 0
    x_train, y_train, x_held, y_held = x_train[keep_train], y_train[keep_train], x_held[keep_held], y_held[keep_held]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    sizes = [len(COLOURS), len(SHAPES), len(SIZES)]
    probe = torch.nn.Linear(x_train.shape[1], sum(sizes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)

    def scores(x, y):
        logits = probe((x - mean) / std).split(sizes, dim=-1)
        loss, accuracy = 0.0, []
        for i, lg in enumerate(logits):
            keep = y[:, i] >= 0
            loss = loss + F.cross_entropy(lg[keep], y[keep, i])
            accuracy.append(round(float((lg[keep].argmax(-1) == y[keep, i]).float().mean()), 3))
        return loss, accuracy

    for _ in range(steps):  # full-batch Adam: the features fit in memory
        loss, _ = scores(x_train, y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    names = ("colour", "shape", "size")
    with torch.no_grad():
        return dict(zip(names, scores(x_train, y_train)[1])), dict(zip(names, scores(x_held, y_held)[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="assets/checkpoints/tiny")
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--train", type=int, default=4000, help="train examples for the probe")
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from segcompass.model import SegCompass

    model = SegCompass.from_pretrained(args.checkpoint).eval()
    train, held = labelled_examples(args.data, args.split, model.config, args.train)
    x_train, y_train = _features(model, train)
    x_held, y_held = _features(model, held)
    train_acc, held_acc = fit_probe(x_train, y_train, x_held, y_held, args.steps)
    report = {"checkpoint": args.checkpoint, "train_examples": len(train),
              "held_out": f"{args.split} ({len(held)})",
              "labelled_tokens_held_out": int((y_held[:, 0] >= 0).sum()),
              "train_accuracy": train_acc, "held_out_accuracy": held_acc}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
