"""Gradient collection: stream calibration feeds through the torch evaluator and feed observers with dL/dT.

For PTQ4ViT's Hessian-guided metric a pass needs ``G = dL/dO`` for each quantized layer's output ``O``, with a
loss ``L`` whose gradient is non-zero at the FP model. Losses (``loss=``):

* ``"pseudo-label"``: cross-entropy of the model output against its own argmax over the last axis (classifier
  logits ``[batch, classes]``, LM logits ``[batch, tokens, vocab]``: one label per token).
* ``"contrastive"``: InfoNCE of each output row (an embedding) against the FP embeddings of every calibration
  row (:func:`~onnxsmith.calibration.torch_graph.contrastive_distillation`), for embedding models.
* ``"auto"``: from the model's ``onnxsmith.task`` metadata (written by the zoo's exports; set it on your own
  models): ``classification`` and ``causal-lm`` take ``pseudo-label``, ``embedding`` takes ``contrastive``;
  without it, ``pseudo-label``.

The loss reads the graph's first output. Memory: one feed's forward graph and gradients at a time; observers
decide what they keep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch
from tqdm import tqdm

from onnxsmith.calibration.learning import resolve_loss
from onnxsmith.calibration.observers import Observer
from onnxsmith.calibration.torch_graph import LossFn, TorchGraph, contrastive_distillation, pseudo_label_cross_entropy
from onnxsmith.core.feeds import Feed

def collect_gradients(
    model: onnx.ModelProto,
    observers: Mapping[str, Observer],
    feeds: Sequence[Feed],
    *,
    loss: str = "auto",
    progress: bool = True,
) -> Mapping[str, Observer]:
    """Let each observer watch ``dL/dT`` of its tensor ``T`` for every feed, in feed order; returns ``observers``.

    Raises ``NotImplementedError`` when the torch evaluator lacks an op of the model, ``KeyError`` for unknown
    tensor names.
    """
    if not observers:
        return observers
    graph = TorchGraph(model)
    names = list(observers)
    output = graph.output_names[0]
    kind = resolve_loss(model, loss)
    bank, offsets = _output_bank(graph, feeds, output) if kind == "contrastive" else (None, [])
    bar = tqdm(feeds, desc="gradients", unit="batch", leave=False, disable=None if progress else True)
    for index, feed in enumerate(bar):
        loss_fn: LossFn
        if bank is not None:
            loss_fn = contrastive_distillation(output, bank, offsets[index])
        else:
            loss_fn = pseudo_label_cross_entropy(output)
        for name, grad in graph.output_gradients(feed, names, loss_fn).items():
            observers[name].observe(grad)
    return observers


def _output_bank(graph: TorchGraph, feeds: Sequence[Feed], output: str) -> tuple[np.ndarray, list[int]]:
    """FP ``output`` rows ``[rows, D]`` of every feed stacked, and the first row of each feed."""
    rows = []
    with torch.no_grad():
        for feed in feeds:
            value = graph.run(feed)[output].numpy()
            rows.append(value.reshape(-1, value.shape[-1]))
    offsets = np.cumsum([0] + [len(r) for r in rows[:-1]]).tolist()
    return np.concatenate(rows), offsets
