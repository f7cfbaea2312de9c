import numpy as np

import graphs
from onnxsmith.calibration.observers import QuantizationNoiseObserver
from onnxsmith.calibration.qparams import fake_quantize
from onnxsmith.optimizer.layer_fidelity import activation_sqnr
from onnxsmith.optimizer.manager import PassManager
from onnxsmith.core.pass_base import PassContext
from onnxsmith.optimizer.recipes import load_recipe
from onnxsmith.optimizer.report import markdown


def test_noise_observer_streams_the_same_sqnr_as_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 7)).astype(np.float32) for _ in range(5)]
    observer = QuantizationNoiseObserver(np.float32(0.02), np.uint8(128))
    for batch in batches:
        observer.observe(batch)
    data = np.concatenate(batches)
    restored = fake_quantize(data, np.float32(0.02), np.uint8(128), np.uint8)
    expected = 10 * np.log10(np.sum(data.astype(np.float64) ** 2) / np.sum((data - restored).astype(np.float64) ** 2))
    assert abs(observer.sqnr_db() - expected) < 1e-9
    assert observer.state_bytes() == QuantizationNoiseObserver(np.float32(1), np.uint8(0)).state_bytes()


def test_activation_sqnr_covers_every_quantized_activation():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 6, 16)).astype(np.float32)} for _ in range(4)]
    reference = graphs.attention_block()
    result = PassManager(load_recipe("w8a8").build(), probe_feeds=feeds[:1]).run(
        graphs.attention_block(), PassContext(calibration_data=feeds))
    sqnr = activation_sqnr(reference, result.model, feeds, progress=False)
    assert sorted(sqnr) == sorted(["x", "q", "kt", "p", "v", "ctx"])
    assert all(20 < value < 80 for value in sqnr.values())


def test_report_lists_layers_worst_first():
    data = {
        "source": "m", "output": "o", "recipe": {"name": "w8a8", "source": "built-in"}, "verification": "v",
        "seconds": 1.0,
        "passes": [{"name": "int8-qdq", "lossless": False, "seconds": 0.1, "modified": True, "nodes_before": 1,
                    "nodes_after": 2, "changes": {}, "verification": None,
                    "details": [{"tensor": "w", "kind": "weight", "sqnr_db": 40.0}]}],
        "evaluation": {"feeds": 1, "metrics": {}, "output_sqnr_db": {}, "latency_ms": {}, "size_bytes": {},
                       "activation_sqnr_db": {"a": 20.0, "b": 30.0}},
    }
    text = markdown(data)
    table = text[text.index("Per-layer SQNR"):]
    assert table.index("`a`") < table.index("`b`") < table.index("`w`")


def _ptq(model, feeds, **options):
    from onnxsmith.passes.ptq_qdq import PtqQuantize
    from onnxsmith.passes.shape_inference import ShapeInference

    passes = [ShapeInference(), PtqQuantize(rounds=1, n=10, **options)]
    return PassManager(passes).run(model, PassContext(calibration_data=feeds)).model


def test_activation_sqnr_per_layer_k_bit_and_twin_forms():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 6, 16)).astype(np.float32) * 2} for _ in range(3)]
    reference = graphs.attention_block()
    results = {form: activation_sqnr(reference, _ptq(graphs.attention_block(), feeds, abits=6, twin=True,
                                                       twin_form=form), feeds, progress=False)
               for form in ("fake-quant", "dual-gemm")}
    expected = {f"x ({p}_proj)" for p in "qkv"} | {"q", "kt", "p", "v", "ctx"}
    assert set(results["fake-quant"]) == set(results["dual-gemm"]) == expected
    assert abs(results["fake-quant"]["p"] - results["dual-gemm"]["p"]) < 1e-6  # parts summed = the twin tensor
    assert all(15 < value < 60 for value in results["fake-quant"].values())  # 6-bit: about 6 dB per bit
