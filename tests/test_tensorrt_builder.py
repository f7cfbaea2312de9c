"""TensorRT backend: build plan, optimization profile and layer summary (pure), the TensorRT guard, and a GPU build."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
from graphs import make_model
from onnx import TensorProto, helper, numpy_helper

from onnxsmith.backends import tensorrt as backend
from onnxsmith.backends.tensorrt import LayerSummary, optimization_profile, precision_plan, summarize_layers
from onnxsmith.core.feeds import InputSpec
from onnxsmith.core.errors import UserError


def _float(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _sparse_k(k: int = 8, n: int = 4) -> np.ndarray:
    """[K, N] weight with two zeros in every 4 consecutive entries along K, dense along N."""
    weight = np.random.default_rng(0).uniform(1, 2, (k, n)).astype(np.float32)
    weight[0::4] = weight[1::4] = 0  # rows 0, 1 of every group of four
    return weight


def _sparse_n_only(k: int = 8, n: int = 8) -> np.ndarray:
    """[K, N] weight with the 2:4 pattern along N only (every column group along K is dense)."""
    weight = np.random.default_rng(1).uniform(1, 2, (k, n)).astype(np.float32)
    weight[:, 0::4] = weight[:, 1::4] = 0
    return weight


def matmul_model(weight: np.ndarray, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    array = weight.astype(helper.tensor_dtype_to_np_dtype(elem))
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                      [_float("x", ["batch", weight.shape[0]], elem)], [_float("y", ["batch", weight.shape[1]], elem)],
                      [numpy_helper.from_array(array, "w")])


def qdq_int8_model(weight: np.ndarray, act_type=TensorProto.INT8, zero_point: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ (activation, ``act_type``) -> MatMul with an int8 weight read through DequantizeLinear."""
    act_zp = helper.make_tensor("act_zp", act_type, [], [zero_point])
    inits = [numpy_helper.from_array(np.float32(0.05), "act_scale"), act_zp,
             numpy_helper.from_array(np.clip(np.round(weight * 50), -127, 127).astype(np.int8), "wq"),
             numpy_helper.from_array(np.float32(0.02), "w_scale"), numpy_helper.from_array(np.int8(0), "w_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "act_scale", "act_zp"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["w"], name="w_dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    return make_model(nodes, [_float("x", [1, weight.shape[0]])], [_float("y", [1, weight.shape[1]])], inits)


def int4_model(weight: np.ndarray, block: int = 4) -> onnx.ModelProto:
    """A MatMul reading an INT4 weight through a blocked DequantizeLinear (opset 21), float activations."""
    k, n = weight.shape
    q = np.clip(np.round(weight * 3), -8, 7).astype(np.int64)
    inits = [helper.make_tensor("wq", TensorProto.INT4, [k, n], q.reshape(-1).tolist()),
             numpy_helper.from_array(np.full((k // block, n), 0.3, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "w_scale"], ["w"], axis=0, block_size=block, name="w_dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [_float("x", [1, k])], [_float("y", [1, n])], inits, opset=21)


# --- precision_plan -------------------------------------------------------------------------------------------


def test_qdq_int8_model_is_strongly_typed_without_precision_flags():
    plan = precision_plan(qdq_int8_model(np.random.default_rng(2).uniform(-1, 1, (8, 4))))
    assert (plan.qdq, plan.int8, plan.int4_weights) == (True, True, False)
    assert plan.network_flags == ("STRONGLY_TYPED",)
    assert plan.builder_flags == ()
    assert plan.problems == ()


def test_uint8_asymmetric_qdq_is_reported_as_a_problem():
    plan = precision_plan(qdq_int8_model(np.random.default_rng(2).uniform(-1, 1, (8, 4)), TensorProto.UINT8, 128))
    assert plan.network_flags == ("STRONGLY_TYPED",)
    assert any("UINT8" in p for p in plan.problems)
    assert sum("qdq-zero-point" in p for p in plan.problems) == 2


def test_int4_dequantized_weight_is_detected():
    plan = precision_plan(int4_model(np.random.default_rng(3).uniform(-1, 1, (8, 4))))
    assert (plan.qdq, plan.int4_weights, plan.int8) == (True, True, False)
    assert plan.network_flags == ("STRONGLY_TYPED",) and plan.builder_flags == ()


def test_2_4_weight_along_k_gives_sparse_weights():
    plan = precision_plan(matmul_model(_sparse_k()))
    assert plan.sparse_layers == ("mm",)
    assert plan.builder_flags == ("FP16", "SPARSE_WEIGHTS")
    assert plan.network_flags == ()


def test_2_4_weight_along_n_only_is_not_sparse():
    plan = precision_plan(matmul_model(_sparse_n_only()))
    assert plan.sparse_layers == ()
    assert plan.builder_flags == ("FP16",)


def test_sparse_int8_weight_behind_dequantize_in_a_qdq_model():
    plan = precision_plan(qdq_int8_model(_sparse_k()))
    assert plan.builder_flags == ("SPARSE_WEIGHTS",)
    assert plan.network_flags == ("STRONGLY_TYPED",)


def test_sparse_int4_weight_behind_dequantize():
    plan = precision_plan(int4_model(_sparse_k()))
    assert plan.sparse_layers == ("mm",) and plan.int4_weights


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_input_axis_follows_trans_b(trans_b):
    weight = _sparse_k(8, 4)  # [K, N], 2:4 along K
    stored = weight.T if trans_b else weight
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b, name="gemm")],
                       [_float("x", [2, 8])], [_float("y", [2, 4])], [numpy_helper.from_array(stored, "w")])
    assert precision_plan(model).sparse_layers == ("gemm",)
    # the same stored array under the other transB reads its 2:4 axis as the output axis: not sparse
    wrong = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1 - trans_b, name="gemm")],
                       [_float("x", [2, stored.shape[1 - trans_b]])], [_float("y", [2, stored.shape[trans_b]])],
                       [numpy_helper.from_array(stored, "w")])
    assert precision_plan(wrong).sparse_layers == ()


def test_conv_weight_checked_along_input_channels():
    weight = np.random.default_rng(4).uniform(1, 2, (4, 8, 3, 3)).astype(np.float32)
    weight[:, 0::4] = weight[:, 3::4] = 0
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                       [_float("x", [1, 8, 5, 5])], [_float("y", [1, 4, 5, 5])], [numpy_helper.from_array(weight, "w")])
    assert precision_plan(model).sparse_layers == ("conv",)
    dense_in = np.ascontiguousarray(weight.transpose(1, 0, 2, 3))  # [8, 4, ...]: zeros now along the output axis
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                       [_float("x", [1, 4, 5, 5])], [_float("y", [1, 8, 5, 5])],
                       [numpy_helper.from_array(dense_in, "w")])
    assert precision_plan(model).sparse_layers == ()


def test_matmul_weight_behind_transpose():
    stored = np.ascontiguousarray(_sparse_k(8, 4).T)  # [N, K]; Transpose gives the [K, N] weight
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="MatMul_1")]
    model = make_model(nodes, [_float("x", [1, 8])], [_float("y", [1, 4])], [numpy_helper.from_array(stored, "wt")])
    assert precision_plan(model).sparse_layers == ("MatMul_1",)


def test_float_model_gets_fp16_unless_disabled():
    dense = np.random.default_rng(5).uniform(-1, 1, (8, 4))
    plan = precision_plan(matmul_model(dense))
    assert (plan.qdq, plan.builder_flags, plan.network_flags, plan.fp16_tensors) == (False, ("FP16",), (), False)
    assert precision_plan(matmul_model(dense), fp16=False).builder_flags == ()
    assert precision_plan(matmul_model(dense, TensorProto.FLOAT16)).fp16_tensors


# --- optimization_profile -------------------------------------------------------------------------------------


KV_SPECS = {
    "input_ids": InputSpec(np.dtype(np.int64), (1, None)),
    "past": InputSpec(np.dtype(np.float32), (1, 2, None, 4)),
    "scale": InputSpec(np.dtype(np.float32), (4,)),
}


def _kv_feed(seq: int, past: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.zeros((1, seq), np.int64), "past": np.zeros((1, 2, past, 4), np.float32),
            "scale": np.ones(4, np.float32)}


def test_profile_spans_feeds_with_an_empty_past_and_picks_the_most_common_feed():
    feeds = [_kv_feed(6, 0), _kv_feed(1, 6), _kv_feed(1, 6), _kv_feed(1, 9)]
    profile = optimization_profile(KV_SPECS, feeds)
    assert set(profile) == {"input_ids", "past"}  # static inputs need no profile
    assert profile["input_ids"] == ((1, 1), (1, 1), (1, 6))
    assert profile["past"] == ((1, 2, 0, 4), (1, 2, 6, 4), (1, 2, 9, 4))


def test_profile_opt_is_the_largest_feed_when_all_differ():
    feeds = [{"input_ids": (1, 3), "past": (1, 2, 0, 4)}, {"input_ids": (1, 1), "past": (1, 2, 7, 4)}]
    profile = optimization_profile(KV_SPECS, feeds)
    assert profile["input_ids"][1] == (1, 1) and profile["past"][1] == (1, 2, 7, 4)  # one whole feed, not maxima


def test_profile_without_feeds_for_a_dynamic_input_names_it():
    with pytest.raises(ValueError, match="'past'"):
        optimization_profile(KV_SPECS, [{"input_ids": (1, 4)}])


def test_profile_rejects_a_feed_that_breaks_a_fixed_dim():
    with pytest.raises(ValueError, match="'past'"):
        optimization_profile(KV_SPECS, [{"input_ids": (1, 4), "past": (1, 3, 2, 4)}])


def test_static_model_needs_no_profile():
    assert optimization_profile({"x": InputSpec(np.dtype(np.float32), (1, 8))}, []) == {}


# --- summarize_layers -----------------------------------------------------------------------------------------


ENGINE_INFO = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat",
         "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "x'", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "fc1 + relu", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "xq", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "h", "Format/Datatype": "Channel major INT8 format where channel % 16 == 0"}],
         "Weights": {"Type": "Int8", "Count": 4096}, "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32"},
        {"Name": "fc2", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "h", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": [{"Name": "y", "Format/Datatype": "Half"}], "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc"},
        {"Name": "lm_head_myl0", "LayerType": "gemm",
         "Inputs": [{"Name": "y", "Format/Datatype": "Half"}, {"Name": "__mye12_dconst", "Format/Datatype": "Int4"}],
         "Outputs": [{"Name": "logits", "Format/Datatype": "Float"}], "TacticName": "sm90_xmma_gemm_f16f16"},
        {"Name": "uint8 input", "LayerType": "Reformat", "Inputs": [{"Name": "u", "Format/Datatype": "UInt8"}],
         "Outputs": [{"Name": "u'", "Format/Datatype": "Float"}], "HasSparseWeights": 0},
        {"Name": "aux stream sync", "LayerType": "signal", "Inputs": [], "Outputs": []},
    ],
    "Bindings": ["x", "logits"],
}


def test_layer_summary_from_engine_inspector_json():
    summary = summarize_layers(ENGINE_INFO)
    assert summary.layers == 5  # the signal entry is not a layer
    assert summary.sparse_weights == ("fc1 + relu", "fc2")
    assert summary.sparse_tactics == ("fc1 + relu",)
    assert summary.int8 == ("fc1 + relu",)  # UInt8 is not INT8
    assert summary.int4 == ("lm_head_myl0",)
    assert summary.fp16 == ("fc2", "lm_head_myl0")
    assert summary.counts() == {"layers": 5, "sparse_weights": 2, "sparse_tactics": 1, "int8": 1, "int4": 1,
                                "fp16": 2}
    assert summary.line().startswith("5 layers: 1 INT8, 1 INT4-weight, 2 FP16; 2 with sparse weights, 1 on sparse")


def test_layer_summary_of_names_only_and_malformed_information():
    summary = summarize_layers({"Layers": ["fc1", "fc2"], "Bindings": []})
    assert summary == LayerSummary(2, detailed=False)
    with pytest.raises(ValueError, match="Layers"):
        summarize_layers({"Bindings": []})


# --- TensorRT guard and build ---------------------------------------------------------------------------------


def test_require_tensorrt_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT is installed
    with pytest.raises(UserError, match=r"^TensorRT is not installed here; engines need an NVIDIA GPU") as info:
        backend.require_tensorrt()
    assert "\n" not in str(info.value) and "pip install tensorrt" in str(info.value)


def test_build_engine_without_tensorrt_fails_before_reading_the_model(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="TensorRT is not installed"):
        backend.build_engine(tmp_path / "missing.onnx", tmp_path / "out.plan", [])
    assert not (tmp_path / "out.plan").exists()


@pytest.mark.parametrize("version, cuda, message", [("8.6.1", True, "too old"), ("10.3.0", False, "no CUDA GPU")])
def test_require_tensorrt_checks_version_and_gpu(monkeypatch, version, cuda, message):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(UserError, match=message):
        backend.require_tensorrt()


def test_require_tensorrt_returns_the_module(monkeypatch):
    import torch

    fake = types.SimpleNamespace(__version__="10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.require_tensorrt() is fake


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "engine.plan"
    path.write_bytes(b"old")
    backend._write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_build_and_time_a_tiny_engine(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installed (its wheels need NVIDIA's package index)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    weight = _sparse_k(64, 64)
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(matmul_model(weight), onnx_path)
    feeds = [{"x": np.ones((batch, 64), np.float32)} for batch in (1, 4, 4, 8)]
    cache = tmp_path / "timing.cache"
    report = backend.build_engine(onnx_path, tmp_path / "tiny.plan", feeds, timing_cache=cache, workspace_mib=256)
    assert report.builder_flags == ("FP16", "SPARSE_WEIGHTS") and report.network_flags == ()
    assert report.profile == {"x": ((1, 64), (4, 64), (8, 64))}
    assert (tmp_path / "tiny.plan").stat().st_size > 0 and cache.stat().st_size > 0
    assert report.layers.layers >= 1 and report.layers.detailed
    latency = backend.measure_latency(tmp_path / "tiny.plan", feeds[1], runs=5, warmup=2)
    assert 0 < latency["median_ms"] <= latency["p90_ms"]
