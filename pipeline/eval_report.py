"""Per-class evaluation for `cacr evaluate`: what a long-tailed training set does to each class.

Computed from what :func:`pipeline.evaluate.evaluate` already has (frozen features of the training
split = kNN bank / probe training set, of the validation split = queries, and the probe's
predictions), and written to the evaluation JSON and to TensorBoard.

JSON (added to the result by :func:`class_report`)::

    per_class: {class_names, train_counts, val_counts, knn_top1: [..], linear_top1: [..] | null}
    groups: {rule, scale, many_above, few_below, classes: {many, medium, few},
             knn_top1: {many, medium, few}, linear_top1: {...}}

Per-class accuracy of class c = correct predictions / validation images of class c (null for a
class without validation images). Group accuracy = correct / validation images over the classes of
the group (the validation split is balanced, so this is also the mean of the per-class figures).

Groups come from the TRAINING split's class counts n_c (what the encoder and the probe saw). The
usual long-tail rule (ImageNet-LT, CIFAR-100-LT) is many-shot n_c > 100, medium 20 ≤ n_c ≤ 100,
few-shot n_c < 20, for sets whose head class has >= 500 images. For smaller sets the thresholds
are scaled by ``s = min(1, n_max / 500)``: many n_c > 100·s, few n_c < 20·s. Both thresholds and
``s`` are stated in the JSON. (Digits exp:100, n_max = 142: s = 0.284, many > 28.4, few < 5.68.)

TensorBoard (:func:`write_tensorboard`, under the run's ``tensorboard/`` or ``--tensorboard DIR``),
at step = the checkpoint's epoch:

* image ``eval/per_class_accuracy``: bar chart, kNN and linear per class, train counts under the bars;
* images ``eval/confusion_matrix/knn`` and ``eval/confusion_matrix/linear``: row-normalised
  (true class rows, predicted class columns), darker = more;
* scalars ``eval/<metric>`` and ``eval/<metric>/<group>``;
* the embedding projector: validation backbone features (up to ``projector_samples``) with metadata
  columns label / class / group and a sprite of the images (``projector_config.pbtxt`` at the log
  dir, ``<step:05d>/val_features/{tensors,metadata}.tsv, sprite.png``).

Images are drawn with PIL (no plotting library needed).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

REFERENCE_HEAD = 500          # head-class size at which the >100 / <20 rule applies unscaled
MANY_ABOVE, FEW_BELOW = 100, 20
GROUPS = ("many", "medium", "few")
COLORS = {"knn": (31, 119, 180), "linear": (255, 127, 14)}


# ----------------------------------------------------------------------------------------------
# Numbers


def shot_groups(train_counts: Sequence[int]) -> dict[str, Any]:
    """Many / medium / few-shot classes from the training counts (rule in the module docstring)."""
    counts = np.asarray(train_counts, dtype=np.int64)
    n_max = int(counts.max()) if counts.size else 0
    s = min(1.0, n_max / REFERENCE_HEAD)
    many, few = MANY_ABOVE * s, FEW_BELOW * s
    classes = {"many": [int(c) for c in np.flatnonzero(counts > many)],
               "medium": [int(c) for c in np.flatnonzero((counts >= few) & (counts <= many))],
               "few": [int(c) for c in np.flatnonzero(counts < few)]}
    return {"rule": f"many: train count > {MANY_ABOVE}*s, medium: {FEW_BELOW}*s .. {MANY_ABOVE}*s, "
                    f"few: < {FEW_BELOW}*s, s = min(1, largest class / {REFERENCE_HEAD})",
            "scale": round(s, 6), "many_above": round(many, 4), "few_below": round(few, 4),
            "classes": classes}


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class (None where the class has no sample)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    total = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[pred == labels], minlength=num_classes)
    return [float(correct[c] / total[c]) if total[c] else None for c in range(num_classes)]


def group_accuracy(pred: np.ndarray, labels: np.ndarray, classes: dict[str, list[int]]) -> dict[str, float | None]:
    """Accuracy over the samples whose class is in each group (None for an empty group)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    out: dict[str, float | None] = {}
    for g in GROUPS:
        sel = np.isin(labels, classes[g])
        out[g] = float((pred[sel] == labels[sel]).mean()) if sel.any() else None
    return out


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(pred, np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_report(train_labels: np.ndarray, val_labels: np.ndarray, predictions: dict[str, np.ndarray | None],
                 num_classes: int, class_names: Sequence[str] = ()) -> dict[str, Any]:
    """The ``per_class`` and ``groups`` entries of the evaluation JSON. ``predictions`` maps a method
    (``knn``, ``linear``) to its validation predictions, or None when it did not run."""
    names = [str(n) for n in class_names] if len(class_names) >= num_classes else \
        [str(c) for c in range(num_classes)]
    train_counts = np.bincount(train_labels, minlength=num_classes)[:num_classes].tolist()
    groups = shot_groups(train_counts)
    per_class: dict[str, Any] = {"class_names": names[:num_classes], "train_counts": train_counts,
                                 "val_counts": np.bincount(val_labels, minlength=num_classes).tolist()}
    for method, pred in predictions.items():
        key = f"{method}_top1"
        per_class[key] = None if pred is None else per_class_accuracy(pred, val_labels, num_classes)
        groups[key] = None if pred is None else group_accuracy(pred, val_labels, groups["classes"])
    return {"per_class": per_class, "groups": groups}


# ----------------------------------------------------------------------------------------------
# Pictures (uint8 HWC arrays)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def bar_chart(per_class: dict[str, Any], title: str = "per-class top-1 accuracy") -> np.ndarray:
    """Grouped bars (one colour per method) of per-class accuracy; class name and training count
    under each group, gridlines every 0.25."""
    from PIL import Image, ImageDraw

    names, counts = per_class["class_names"], per_class["train_counts"]
    series = [(m, per_class[f"{m}_top1"]) for m in COLORS if per_class.get(f"{m}_top1") is not None]
    C, S = len(names), max(1, len(series))
    bw = int(max(2, min(14, 1200 // max(1, C * (S + 1)))))
    group_w = bw * S + max(2, bw // 2)
    left, top, plot_h, bottom = 44, 34, 220, 44
    width, height = max(320, left + C * group_w + 20), top + plot_h + bottom
    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), _font()
    d.text((left, 4), title, fill="black", font=font)
    lx = left + 6 * len(title) + 20
    for m, _ in series:
        d.rectangle([lx, 6, lx + 10, 14], fill=COLORS[m])
        d.text((lx + 14, 4), m, fill="black", font=font)
        lx += 14 + 7 * len(m) + 16
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h - int(t * plot_h)
        d.line([left, y, width - 10, y], fill=(220, 220, 220))
        d.text((4, y - 6), f"{t:.2f}", fill="black", font=font)
    for c in range(C):
        x0 = left + c * group_w
        for s, (m, acc) in enumerate(series):
            v = acc[c]
            if v is None:
                continue
            y = top + plot_h - int(round(v * plot_h))
            d.rectangle([x0 + s * bw, y, x0 + (s + 1) * bw - 1, top + plot_h], fill=COLORS[m])
        if C <= 40:
            d.text((x0, top + plot_h + 4), names[c][:6], fill="black", font=font)
            d.text((x0, top + plot_h + 18), str(counts[c]), fill=(90, 90, 90), font=font)
    d.text((4, top + plot_h + 18), "train", fill=(90, 90, 90), font=font)
    return np.asarray(img, dtype=np.uint8)


def confusion_image(cm: np.ndarray, class_names: Sequence[str], title: str) -> np.ndarray:
    """Row-normalised confusion matrix as a heat map (white = 0, dark blue = 1)."""
    from PIL import Image, ImageDraw

    C = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    cell = int(max(2, min(32, 480 // max(1, C))))
    labels = C <= 40
    left = top = 40 if labels else 20
    size = C * cell
    img = Image.new("RGB", (left + size + 10, top + size + 24), "white")
    d, font = ImageDraw.Draw(img), _font()
    dark = np.array([8, 48, 107], dtype=np.float64)
    rgb = (255 - frac[..., None] * (255 - dark)).astype(np.uint8)           # (C, C, 3)
    heat = np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))
    img.paste(Image.fromarray(heat), (left, top))
    d.text((4, 4), title, fill="black", font=font)
    d.text((left, top + size + 8), "predicted ->   rows: true class", fill="black", font=font)
    if labels:
        for c in range(C):
            d.text((left + c * cell + 2, top - 14), str(class_names[c])[:3], fill="black", font=font)
            d.text((4, top + c * cell + max(0, cell // 2 - 6)), str(class_names[c])[:5], fill="black", font=font)
        if cell >= 24:
            for i in range(C):
                for j in range(C):
                    if cm[i, j]:
                        d.text((left + j * cell + 2, top + i * cell + cell // 2 - 6), f"{frac[i, j]:.2f}"[1:]
                               if frac[i, j] < 1 else "1.0", fill="white" if frac[i, j] > 0.5 else "black",
                               font=font)
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# TensorBoard


def default_logdir(checkpoint: str) -> str:
    """``<run>/tensorboard`` for a checkpoint ``<run>/checkpoint_*/`` (or its ``state.pt``)."""
    path = checkpoint.rstrip("/")
    if path.endswith("/state.pt") or path == "state.pt":
        path = path[: -len("state.pt")].rstrip("/") or "."
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    return f"{parent}/tensorboard"


def thumbnails(images: np.ndarray, size: int = 32):
    """uint8 (n, H, W, 3) -> float32 tensor (n, 3, s, s) in [0, 1], s = min(size, H): the sprite."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1)


def write_tensorboard(logdir: str, report: dict[str, Any], result: dict[str, Any], predictions: dict,
                      val_labels: np.ndarray, *, step: int, storage=None,
                      projector: dict[str, np.ndarray] | None = None) -> str:
    """Write the pictures, scalars and projector of one evaluation; return the log dir.

    ``projector``: {"features" (m, F), "labels" (m,), "images" uint8 (m, H, W, 3)} or None."""
    from pipeline.monitor import TensorBoard

    tb = TensorBoard(logdir, storage)
    try:
        w, pc, groups = tb.writer, report["per_class"], report["groups"]
        C = len(pc["class_names"])
        w.add_image("eval/per_class_accuracy", bar_chart(pc), step, dataformats="HWC")
        for m, pred in predictions.items():
            if pred is not None:
                cm = confusion_matrix(pred, val_labels, C)
                w.add_image(f"eval/confusion_matrix/{m}", confusion_image(cm, pc["class_names"], f"{m}: confusion"),
                            step, dataformats="HWC")
            if groups.get(f"{m}_top1"):
                for g, v in groups[f"{m}_top1"].items():
                    if v is not None:
                        w.add_scalar(f"eval/{m}_top1/{g}", v, step)
        for key in ("knn_top1", "linear_top1"):
            if result.get(key) is not None:
                w.add_scalar(f"eval/{key}", result[key], step)
        if projector is not None and len(projector["labels"]):
            group_of = {c: g for g in GROUPS for c in groups["classes"][g]}
            meta = [[int(y), pc["class_names"][int(y)], group_of.get(int(y), "-")] for y in projector["labels"]]
            w.add_embedding(projector["features"], metadata=meta, metadata_header=["label", "class", "group"],
                            label_img=thumbnails(projector["images"]), global_step=step, tag="val_features")
    finally:
        tb.close()
    return logdir


def projector_rows(url: str, split: str, ids: np.ndarray, features: np.ndarray, labels: np.ndarray, *,
                   limit: int, data=None, storage=None, batch_size: int = 512) -> dict[str, np.ndarray]:
    """The first ``limit`` rows (by sample id) of the evaluated ``split``: their features and labels,
    and their images read back through the pipeline's reader (shards are shuffled at write time,
    so the first ids are a sample of every class)."""
    from pipeline.data import build_dataset, split_batch

    take = np.asarray(ids)[:limit]
    wanted = {int(i): n for n, i in enumerate(take)}
    images: list[np.ndarray | None] = [None] * len(take)
    found = 0
    ds = build_dataset(url, split, data=data, storage=storage, shuffle=False)
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        img, _, _ = split_batch({"image": b["image"], "label": b["label"], "skip": b["skip"]})
        bid, _, _ = split_batch({"image": b["id"], "label": b["label"], "skip": b["skip"]})
        for i, im in zip(bid, img):
            n = wanted.get(int(i))
            if n is not None and images[n] is None:
                images[n], found = im, found + 1
        if found == len(take):
            break
    keep = [n for n, im in enumerate(images) if im is not None]
    return {"features": np.asarray(features)[keep], "labels": np.asarray(labels)[keep],
            "images": np.stack([images[n] for n in keep]) if keep else np.zeros((0, 8, 8, 3), np.uint8)}


def per_class_evaluation(result: dict[str, Any], *, train: tuple[np.ndarray, np.ndarray],
                         val: tuple[np.ndarray, np.ndarray, np.ndarray], num_classes: int,
                         class_names: Sequence[str], linear_pred: np.ndarray | None, knn_k: int,
                         knn_temperature: float, logdir: str | None, step: int, url: str, split: str,
                         data=None, storage=None, projector_samples: int = 1000, echo=print) -> dict[str, Any]:
    """What `cacr evaluate` adds: kNN predictions at ``knn_k``, the per-class / group report (returned,
    for the JSON) and, when ``logdir`` is set, the TensorBoard pictures and projector.

    ``train`` = (features, labels) of the bank, ``val`` = (features, labels, ids) of the queries."""
    import torch

    from cacr.knn import knn_predict

    (xt, yt), (xv, yv, ids) = train, val
    knn_pred = knn_predict(torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xv), k=knn_k,
                           temperature=knn_temperature, num_classes=num_classes).numpy()
    preds = {"knn": knn_pred, "linear": linear_pred}
    report = class_report(yt, yv, preds, num_classes, class_names)
    echo(summary_line(report))
    if logdir:
        proj = projector_rows(url, split, ids, xv, yv, limit=projector_samples, data=data, storage=storage) \
            if projector_samples > 0 else None
        write_tensorboard(logdir, report, result, preds, yv, step=step, storage=storage, projector=proj)
        report["tensorboard"] = logdir
        echo(f"[cacr] per-class chart, confusion matrices and projector: tensorboard --logdir {logdir}")
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One console line: group accuracies per method."""
    parts = []
    for m in COLORS:
        acc = report["groups"].get(f"{m}_top1")
        if acc:
            txt = " / ".join("-" if acc[g] is None else f"{acc[g]:.3f}" for g in GROUPS)
            parts.append(f"{m} {txt}")
    cls = report["groups"]["classes"]
    return (f"[cacr] many / medium / few-shot ({len(cls['many'])}/{len(cls['medium'])}/{len(cls['few'])} "
            f"classes, train count > {report['groups']['many_above']:g} / < {report['groups']['few_below']:g}): "
            + ("; ".join(parts) or "no predictions"))


__all__ = ["shot_groups", "per_class_accuracy", "group_accuracy", "confusion_matrix", "class_report",
           "bar_chart", "confusion_image", "default_logdir", "write_tensorboard", "projector_rows",
           "thumbnails", "summary_line", "per_class_evaluation"]
