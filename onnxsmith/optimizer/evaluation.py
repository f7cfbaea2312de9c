"""Compare an FP32 model with its optimized version: zoo metric, output SQNR, file size and latency."""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data
from tqdm import tqdm

from onnxsmith.backends.onnxruntime import create_session, run_session
from onnxsmith.calibration.collection import with_outputs
from onnxsmith.calibration.metrics import sqnr_db
from onnxsmith.core.feeds import Feed
from onnxsmith.optimizer.layer_fidelity import activation_fidelity
from onnxsmith.optimizer.routing import routing_probe

if TYPE_CHECKING:  # the zoo model is handed in by the pipeline; this layer does not import the zoo
    from onnxsmith.models.base import ZooModel

LAYER_FEEDS = 16
"""Feeds used for the per-layer activation SQNR."""


@dataclass
class Evaluation:
    """Fidelity and cost of a candidate model relative to its reference.

    ``metrics`` holds the zoo model's own figures (empty for non-zoo models); ``output_sqnr_db`` the
    signal-to-quantization-noise ratio of each float output over all feeds (``inf`` when identical);
    ``latency_ms`` the median single-feed latency of each model on the first feed (onnxruntime CPU, all graph
    optimizations on); ``size_bytes`` the files' sizes including external data; ``activation_sqnr_db`` the SQNR
    of each activation the candidate quantizes, measured on FP32 activations of the first ``LAYER_FEEDS`` feeds
    (empty when the candidate quantizes no activation). For mixture-of-experts models ``routing_agreement`` is the
    fraction of (token, MoE layer) pairs whose top-1 expert is the same in both models, and
    ``routing_agreement_by_layer`` the fraction per router (keyed by its choice tensor); None / empty otherwise.
    ``activation_histograms`` holds, for at most 32 of the quantized activations (worst SQNR first, keyed by the
    reference tensor), a 64-bin histogram of its values on the same feeds: ``{"edges": [...], "counts": [...]}``.
    """

    feeds: int
    metrics: dict[str, float] = field(default_factory=dict)
    output_sqnr_db: dict[str, float] = field(default_factory=dict)
    activation_sqnr_db: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    routing_agreement: float | None = None
    routing_agreement_by_layer: dict[str, float] = field(default_factory=dict)
    activation_histograms: dict[str, dict[str, list]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    feeds: Sequence[Feed],
    zoo_model: ZooModel | None = None,
    *,
    latency_runs: int = 10,
    progress: bool = True,
) -> Evaluation:
    """Run both model files on ``feeds`` and measure fidelity, size and latency.

    With ``zoo_model`` the feeds must be (a prefix of) its ``evaluation_feeds()`` and its ``score`` is reported.
    """
    if not feeds:
        raise ValueError("evaluation needs at least one feed")
    routing = routing_probe(onnx.load(str(reference), load_external_data=False),
                            onnx.load(str(candidate), load_external_data=False))
    if routing is None:
        ref_session, cand_session = create_session(reference), create_session(candidate)
    else:
        ref_session = create_session(with_outputs(onnx.load(str(reference)), routing.choices))
        cand_session = create_session(with_outputs(onnx.load(str(candidate)), routing.choices))
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    ref_reduced, cand_reduced = [], []
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    bar = tqdm(feeds, desc="evaluating", unit="feed", leave=False, disable=None if progress else True)
    for index, feed in enumerate(bar):
        ref_out = run_session(ref_session, feed)
        cand_out = run_session(cand_session, feed)
        for name, ref in ref_out.items():
            if np.issubdtype(ref.dtype, np.floating):
                ref64, cand64 = ref.astype(np.float64), cand_out[name].astype(np.float64)
                signal[name] = signal.get(name, 0.0) + float(np.sum(ref64**2))
                noise[name] = noise.get(name, 0.0) + float(np.sum((ref64 - cand64) ** 2))
        if routing is not None:
            routing.add(ref_out, cand_out)
        if zoo_model is not None:
            ref_reduced.append(zoo_model.reduce_outputs(index, ref_out))
            cand_reduced.append(zoo_model.reduce_outputs(index, cand_out))
    result = Evaluation(feeds=len(feeds))
    result.output_sqnr_db = {name: sqnr_db(signal[name], noise[name]) for name in signal}
    if zoo_model is not None:
        result.metrics = zoo_model.score(ref_reduced, cand_reduced)
    if routing is not None:
        result.routing_agreement, result.routing_agreement_by_layer = routing.overall, routing.by_layer()
    result.latency_ms = {
        "reference": median_latency_ms(ref_session, feeds[0], latency_runs),
        "candidate": median_latency_ms(cand_session, feeds[0], latency_runs),
    }
    result.size_bytes = {"reference": model_file_size(reference), "candidate": model_file_size(candidate)}
    candidate_model = onnx.load(str(candidate))
    if any(node.op_type == "QuantizeLinear" for node in candidate_model.graph.node):
        result.activation_sqnr_db, result.activation_histograms = activation_fidelity(
            onnx.load(str(reference)), candidate_model, feeds[:LAYER_FEEDS], progress=progress)
    return result


def median_latency_ms(session: ort.InferenceSession, feed: Feed, runs: int) -> float:
    """Median wall time of ``runs`` runs of one feed, after two warm-up runs."""
    for _ in range(2):
        session.run(None, feed)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def model_file_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a model file plus the external-data files it names beside it."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists())
