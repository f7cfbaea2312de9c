"""benchmarks/gpu_gemm.py: GEMM weight extraction (every form onnxsmith writes), grouping, path eligibility, the
int4pack operand conversion, and the command line without a GPU (dry run, automatic no-GPU, CPU smoke timing)."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxsmith.calibration.int4 import dequantize_blocks, quantize_blocks, rtn_scales
from onnxsmith.core.int4 import int4_initializer
from onnxsmith.core.pass_base import PassContext
from onnxsmith.passes.int4_weight import Int4Weight
from onnxsmith.passes.sparse_conv import SparseGemmToConv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_gemm  # noqa: E402

RNG = np.random.default_rng(11)


def io(k, n, dtype=TensorProto.FLOAT):
    return ([helper.make_tensor_value_info("x", dtype, ["M", k])],
            [helper.make_tensor_value_info("y", dtype, ["M", n])])


def model_of(nodes, k, n, inits, opset=21):
    inputs, outputs = io(k, n)
    return graphs.make_model(nodes, inputs, outputs, inits, opset=opset)


def matmul_model(w, opset=21):
    k, n = w.shape
    return model_of([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], k, n,
                    [numpy_helper.from_array(w, "w")], opset)


def prune_24(w, axis):
    """Keep the 2 largest |w| of every 4 consecutive entries along ``axis``."""
    moved = np.moveaxis(w, axis, 0).copy()
    groups = moved.reshape(moved.shape[0] // 4, 4, -1)
    order = np.argsort(-np.abs(groups), axis=1)
    np.put_along_axis(groups, order[:, 2:], 0.0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), 0, axis)


def only(weights):
    assert len(weights) == 1, [w.name for w in weights]
    return weights[0]


# ------------------------------------------------------------------------------------------- extraction


def test_plain_matmul_weight_is_n_by_k():
    w = RNG.standard_normal((64, 24)).astype(np.float32)
    gemm = only(gpu_gemm.gemm_weights(matmul_model(w)))
    assert (gemm.op, gemm.k, gemm.n, gemm.source, gemm.int4, gemm.levels) == ("MatMul", 64, 24, "float", False, None)
    np.testing.assert_array_equal(gemm.weight, w.T)
    assert gemm.weight.shape == (24, 64) and not gemm.sparse24


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_and_alpha(trans_b):
    w = RNG.standard_normal((32, 16)).astype(np.float32)  # K = 32, N = 16 in GEMM form
    stored = w.T.copy() if trans_b else w
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=trans_b, alpha=0.5)
    gemm = only(gpu_gemm.gemm_weights(model_of([node], 32, 16, [numpy_helper.from_array(stored, "w")])))
    assert (gemm.k, gemm.n) == (32, 16)
    np.testing.assert_allclose(gemm.weight, 0.5 * w.T, rtol=0, atol=0)


def test_int8_per_channel_dequantize_linear_weight():
    q = RNG.integers(-127, 128, size=(48, 8)).astype(np.int8)  # [K, N], per output channel (axis 1)
    scale = RNG.uniform(0.01, 0.1, 8).astype(np.float32)
    zero = RNG.integers(-3, 4, size=8).astype(np.int8)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    gemm = only(gpu_gemm.gemm_weights(model_of(nodes, 48, 8, inits)))
    expected = (q.astype(np.float32) - zero.astype(np.float32)) * scale
    np.testing.assert_allclose(gemm.weight, expected.T, rtol=1e-6)
    assert gemm.source == "int8 DQ per-channel" and not gemm.int4 and gemm.levels is None
    assert gemm.path == "DequantizeLinear"


def int4_model(w, target="tensorrt", block=64):
    model = matmul_model(w)
    return Int4Weight(method="rtn", block_size=block, target=target).run(model, PassContext(progress=False)).model


def test_int4_blocked_dequantize_linear_weight_equals_numpy():
    w = RNG.standard_normal((128, 16)).astype(np.float32)
    model = int4_model(w)
    assert [t.data_type for t in model.graph.initializer if t.name.endswith("_int4")] == [TensorProto.INT4]
    gemm = only(gpu_gemm.gemm_weights(model))
    steps = rtn_scales(w, 64)
    levels = quantize_blocks(w, steps, 64)
    np.testing.assert_allclose(gemm.weight, dequantize_blocks(levels, steps, 64).T, rtol=1e-6, atol=0)
    assert (gemm.source, gemm.int4, gemm.block, gemm.int4_block) == ("INT4 DQ block 64", True, 64, 64)
    np.testing.assert_array_equal(gemm.levels, levels.T)
    np.testing.assert_allclose(gemm.scales, steps.T, rtol=1e-6)
    np.testing.assert_allclose(gemm.levels * np.repeat(gemm.scales, 64, axis=1), gemm.weight, rtol=1e-6)


def test_matmul_nbits_weight_equals_the_dequantize_linear_form():
    w = RNG.standard_normal((128, 16)).astype(np.float32)
    reference = only(gpu_gemm.gemm_weights(int4_model(w)))
    nbits_model = int4_model(w, target="onnxruntime", block=32)
    assert [n.op_type for n in nbits_model.graph.node] == ["MatMulNBits"]
    gemm = only(gpu_gemm.gemm_weights(nbits_model))
    steps = rtn_scales(w, 32)
    np.testing.assert_allclose(gemm.weight, dequantize_blocks(quantize_blocks(w, steps, 32), steps, 32).T, rtol=1e-6)
    assert (gemm.k, gemm.n, gemm.int4_block, gemm.source) == (128, 16, 32, "MatMulNBits block 32")
    assert not np.array_equal(gemm.weight, reference.weight)  # block 32 vs 64: the two readers are not the same code


def test_transposed_int4_weight_behind_a_transpose_and_a_noop_reshape():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((16, 64)).astype(np.float32)  # [N, K]: a tied head's embedding table
    steps = rtn_scales(table.T, 32).T.copy()  # blocked along K = axis 1 of the table: [N, K / 32]
    levels = quantize_blocks(table.T, steps.T, 32).T.copy()
    inits = [int4_initializer("q", levels), numpy_helper.from_array(steps, "s"),
             numpy_helper.from_array(np.zeros(2, np.int64), "zeros")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["e"], name="dq", axis=1, block_size=32),
             helper.make_node("Reshape", ["e", "zeros"], ["g"], name="guard"),
             helper.make_node("Transpose", ["g"], ["t"], name="tr", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "t"], ["y"], name="head")]
    gemm = only(gpu_gemm.gemm_weights(model_of(nodes, 64, 16, inits)))
    assert (gemm.k, gemm.n, gemm.int4_block) == (64, 16, 32)
    assert gemm.path == "DequantizeLinear -> Reshape (no-op) -> Transpose"
    np.testing.assert_allclose(gemm.weight, levels * np.repeat(steps, 32, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(gemm.levels, levels)


def test_int4_blocked_along_n_has_no_int4pack_levels():
    w = RNG.standard_normal((16, 64)).astype(np.float32)  # MatMul [K=16, N=64] blocked along N (axis 1)
    steps = rtn_scales(w.T, 32).T.copy()
    levels = quantize_blocks(w.T, steps.T, 32).T.copy()
    inits = [int4_initializer("q", levels), numpy_helper.from_array(steps, "s")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], name="dq", axis=1, block_size=32),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    gemm = only(gpu_gemm.gemm_weights(model_of(nodes, 16, 64, inits)))
    assert gemm.int4 and gemm.levels is None and gemm.notes == ["blocked along N, not K"]
    np.testing.assert_allclose(gemm.weight, (levels * np.repeat(steps, 32, axis=1)).T, rtol=1e-6)
    assert gpu_gemm.int4_plan(gpu_gemm.group_weights([gemm])[0]) == (None, "blocked along N, not K")


def test_24_detected_along_k_and_not_along_n():
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    along_k, along_n = prune_24(w, 0), prune_24(w, 1)
    from onnxsmith.core.sparsity import satisfies_nm

    assert not satisfies_nm(along_n, 2, 4, 0)  # the N-pruned weight really is dense along K
    assert only(gpu_gemm.gemm_weights(matmul_model(along_k))).sparse24
    assert not only(gpu_gemm.gemm_weights(matmul_model(along_n))).sparse24


def test_sparse_gemm_to_conv_form_is_read_as_the_same_gemm():
    w = prune_24(RNG.standard_normal((64, 32)).astype(np.float32), 0)
    conv = SparseGemmToConv().run(matmul_model(w, opset=17), PassContext()).model
    assert "Conv" in [n.op_type for n in conv.graph.node] and "MatMul" not in [n.op_type for n in conv.graph.node]
    gemm = only(gpu_gemm.gemm_weights(conv))
    assert (gemm.op, gemm.k, gemm.n, gemm.sparse24) == ("Conv", 64, 32, True)
    np.testing.assert_array_equal(gemm.weight, w.T)


def test_activation_gemms_and_kxk_convs_are_skipped_with_reasons():
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "k3")]
    nodes = [helper.make_node("MatMul", ["a", "b"], ["ab"], name="qk"),
             helper.make_node("Conv", ["img", "k3"], ["c"], name="conv3")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
              for n, s in (("a", [2, 8]), ("b", [8, 2]), ("img", [1, 3, 8, 8]))]
    outputs = [helper.make_tensor_value_info("ab", TensorProto.FLOAT, [2, 2]),
               helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 6, 6])]
    skipped = []
    assert gpu_gemm.gemm_weights(graphs.make_model(nodes, inputs, outputs, inits), skipped) == []
    assert skipped == [("qk", "graph input"), ("conv3", "Conv weight [4, 3, 3, 3] is not 1x1")]


def test_groups_count_shapes_and_kinds():
    a, b = RNG.standard_normal((64, 32)).astype(np.float32), RNG.standard_normal((64, 32)).astype(np.float32)
    inits = [numpy_helper.from_array(v, name) for v, name in ((a, "a"), (b, "b"), (prune_24(a, 0), "s"))]
    nodes = [helper.make_node("MatMul", ["x", "a"], ["h1"], name="l1"),
             helper.make_node("MatMul", ["x", "b"], ["h2"], name="l2"),
             helper.make_node("MatMul", ["x", "s"], ["h3"], name="l3"),
             helper.make_node("Sum", ["h1", "h2", "h3"], ["y"], name="sum")]
    groups = gpu_gemm.group_weights(gpu_gemm.gemm_weights(model_of(nodes, 64, 32, inits)))
    assert [(g.shape, g.count, g.sparse24, [w.name for w in g.weights]) for g in groups] == [
        ("64x32", 2, False, ["l1", "l2"]), ("64x32", 1, True, ["l3"])]
    assert gpu_gemm.sparse_reason(groups[0], "cuSPARSELt") == "not 2:4 along K"
    assert gpu_gemm.sparse_reason(groups[1], "cuSPARSELt") is None
    assert gpu_gemm.int4_plan(groups[0]) == (None, "not INT4 in this file")


def test_sparse_constraints_come_from_torch_and_reject_small_n():
    rows, cols, where = gpu_gemm.sparse_constraints("cuSPARSELt")
    assert (rows, cols) == (16, 16) and "SparseSemiStructuredTensorCUSPARSELT" in where
    assert gpu_gemm.sparse_constraints("CUTLASS")[:2] == (32, 64)
    w = prune_24(RNG.standard_normal((64, 8)).astype(np.float32), 0)  # N = 8 < 16
    group = gpu_gemm.group_weights(gpu_gemm.gemm_weights(matmul_model(w)))[0]
    assert gpu_gemm.sparse_reason(group, "cuSPARSELt") == "N = 8 is not a multiple of 16 (cuSPARSELt float16)"
    w = prune_24(RNG.standard_normal((32, 32)).astype(np.float32), 0)  # K = 32: fine for cuSPARSELt, not CUTLASS
    group = gpu_gemm.group_weights(gpu_gemm.gemm_weights(matmul_model(w)))[0]
    assert gpu_gemm.sparse_reason(group, "cuSPARSELt") is None
    assert gpu_gemm.sparse_reason(group, "CUTLASS") == "K = 32 is not a multiple of 64 (CUTLASS float16)"


def test_int4_plan_picks_inner_k_tiles_and_refuses_block_16():
    w = RNG.standard_normal((192, 16)).astype(np.float32)  # K = 192: 64 | K, 128 does not
    group = gpu_gemm.group_weights(gpu_gemm.gemm_weights(int4_model(w)))[0]
    assert gpu_gemm.int4_plan(group) == (4, None)
    small = gpu_gemm.group_weights(gpu_gemm.gemm_weights(int4_model(w[:, :16], "onnxruntime", 16)))[0]
    assert small.int4_block == 16
    assert gpu_gemm.int4_plan(small) == (None, "group size 16 unsupported (torch takes 32/64/128/256)")


# ------------------------------------------------------------------------------------------- int4pack operands


def test_int4pack_operands_shift_levels_and_lay_out_scales():
    levels = np.array([[-8, 7, 0, 1], [2, -1, -8, 7]], np.int8)  # [N=2, K=4]
    scales = np.array([[0.5, 2.0], [0.25, 4.0]], np.float32)  # [N, K / 2]
    unsigned, sz = gpu_gemm.int4pack_operands(levels, scales)
    np.testing.assert_array_equal(unsigned, [[0, 15, 8, 9], [10, 7, 0, 15]])
    assert sz.shape == (2, 2, 2)  # [K / group, N, 2]
    np.testing.assert_array_equal(sz[..., 0], scales.T)
    np.testing.assert_array_equal(sz[..., 1], 0)
    with pytest.raises(ValueError, match="-8..7"):
        gpu_gemm.int4pack_operands(np.array([[8]]), np.ones((1, 1), np.float32))


def test_cuda_nibble_order_puts_the_even_k_index_high():
    packed = gpu_gemm.pack_nibbles_cuda(np.array([[1, 2, 3, 4], [15, 0, 0, 15]]))
    np.testing.assert_array_equal(packed, np.array([[0x12, 0x34], [0xF0, 0x0F]], np.uint8))


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4pack kernel")
def test_int4pack_operands_reproduce_the_weight_with_torchs_cpu_kernel():
    w = RNG.standard_normal((128, 16)).astype(np.float32)
    gemm = only(gpu_gemm.gemm_weights(int4_model(w)))
    unsigned, sz = gpu_gemm.int4pack_operands(gemm.levels, gemm.scales)
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(unsigned.astype(np.int32)), 2)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    got = torch._weight_int4pack_mm_for_cpu(x, packed, 64, torch.from_numpy(sz)).float()
    expected = x @ torch.from_numpy(gemm.weight).T
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    flipped = torch._weight_int4pack_mm_for_cpu(x, packed, 64, torch.from_numpy(sz[..., ::-1].copy())).float()
    assert float((flipped - expected).abs().max() / expected.abs().max()) > 0.1  # scale and zero are not symmetric


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA int4pack kernel)")
def test_int4pack_cuda_kernel_reproduces_the_weight():
    w = RNG.standard_normal((256, 64)).astype(np.float32)
    gemm = only(gpu_gemm.gemm_weights(int4_model(w)))
    backend = gpu_gemm.make_backend("cuda")
    fn, _ = gpu_gemm.int4_function(backend, gemm, 8)
    x = torch.randn(16, 256, device="cuda").bfloat16()
    expected = x.float() @ torch.from_numpy(gemm.weight).cuda().T
    assert float((fn(x).float() - expected).abs().max() / expected.abs().max()) < 0.02


# ------------------------------------------------------------------------------------------- command line


@pytest.fixture
def tiny_files(tmp_path):
    """A 2:4 float MatMul file and an INT4 (block 64, TensorRT form) file, K = 128, N = 32."""
    w = RNG.standard_normal((128, 32)).astype(np.float32)
    sparse, int4 = tmp_path / "sparse.onnx", tmp_path / "int4.onnx"
    onnx.save(matmul_model(prune_24(w, 0)), sparse)
    onnx.save(int4_model(w), int4)
    return sparse, int4


def test_dry_run_prints_the_shape_table_and_no_timings(tiny_files, tmp_path, capsys):
    sparse, int4 = tiny_files
    out = tmp_path / "r.json"
    assert gpu_gemm.main(["--onnx", str(sparse), "--onnx", str(int4), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| K x N " in text and "| 128x32 | 1     |" in text
    assert "yes (group 64, 8 k-tiles)" in text and "INT4 DQ block 64" in text
    assert "dry run: shapes only, no timings" in text
    assert "dense ms" not in text and "weighted totals" not in text
    document = json.loads(out.read_text())
    assert document["timed"] is False and document["complete"] is True
    assert [s["sparse24"] for s in document["sources"]] == [1, 0]
    assert [s["groups"][0]["int4_path"] for s in document["sources"]] == ["not INT4 in this file", "ok"]
    assert "timings" not in document["sources"][0]["groups"][0]


def test_without_cuda_the_run_says_so_and_exits_0(tiny_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_gemm, "cuda_status", lambda: (False, "torch.cuda.is_available() is false"))
    assert gpu_gemm.main(["--onnx", str(tiny_files[0]), "--out", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert gpu_gemm.NO_GPU_LINE == "no CUDA GPU: shapes only, no timings"
    assert gpu_gemm.NO_GPU_LINE in text and "dense ms" not in text
    assert json.loads((tmp_path / "r.json").read_text())["no_timing_reason"] == "torch.cuda.is_available() is false"


def test_cpu_smoke_run_times_dense_and_int4_and_checks_them(tiny_files, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--onnx", str(tiny_files[1]), "--onnx", str(tiny_files[0]), "--device", "cpu", "--tokens", "1,8",
            "--runs", "3", "--reps", "1", "--warmup", "1", "--out", str(out)]
    assert gpu_gemm.main(argv) == 0
    text = capsys.readouterr().out
    assert "weighted totals" in text and "needs CUDA" in text and "WRONG" not in text
    int4_source, sparse_source = json.loads(out.read_text())["sources"]
    rows = int4_source["groups"][0]["timings"]
    assert [r["m"] for r in rows] == [1, 8]
    assert all(r["dense_ms"] > 0 and r["int4_ms"] > 0 and r["int4_ok"] and r["int4_err"] < 0.02 for r in rows)
    assert all(r["sparse_ms"] is None and r["sparse_note"] == "needs CUDA" for r in rows)
    assert [t["int4_layers"] for t in int4_source["totals"]] == [1, 1]
    assert sparse_source["groups"][0]["timings"][0]["int4_note"] == "not INT4 in this file"


def test_bad_arguments_are_refused(tmp_path):
    for argv in (["--tokens", "1,x"], ["--models", "resnet"], ["--onnx", str(tmp_path / "missing.onnx")],
                 ["--set", "int4-wo"], ["--runs", "0"]):
        with pytest.raises(SystemExit):
            gpu_gemm.parse_args(argv)
    args = gpu_gemm.parse_args(["--set", "int4-wo:block_size=128,method=rtn", "--tokens", "4,2"])
    assert args.recipe_options == {"int4-wo": {"block_size": 128, "method": "rtn"}}
    assert args.models == ["smollm2"] and args.recipes == ["sparse24", "int4-wo"] and args.tokens == [4, 2]


def test_saved_groups_round_trip_and_time_without_the_onnx_files(tiny_files, tmp_path, capsys, monkeypatch):
    dense = tmp_path / "dense.onnx"
    onnx.save(matmul_model(RNG.standard_normal((64, 16)).astype(np.float32)), dense)
    saved = tmp_path / "groups.npz"
    monkeypatch.setattr(gpu_gemm, "SAVE_VALUES_LIMIT", 100)  # the dense 64x16 file: shape only
    argv = ["--onnx", str(tiny_files[0]), "--onnx", str(tiny_files[1]), "--onnx", str(dense), "--dry-run",
            "--save-groups", str(saved), "--out", str(tmp_path / "a.json")]
    assert gpu_gemm.main(argv) == 0
    written = json.loads((tmp_path / "a.json").read_text())["saved_groups"]
    assert written["groups"] == 3 and written["shape_only"] == 1
    assert gpu_gemm.saved_labels(saved) == ["sparse.onnx", "int4.onnx", "dense.onnx"]

    originals = [gpu_gemm.gemm_weights(onnx.load(str(path)))[0] for path in (*tiny_files, dense)]
    loaded = [gpu_gemm.load_groups(saved, index).groups[0] for index in range(3)]
    assert [(g.shape, g.count, g.sparse24, g.int4_block) for g in loaded] == [
        ("128x32", 1, True, None), ("128x32", 1, False, 64), ("64x16", 1, False, None)]
    np.testing.assert_array_equal(loaded[0].weights[0].weight, originals[0].weight.astype(np.float16))
    np.testing.assert_array_equal(loaded[1].weights[0].levels, originals[1].levels)
    np.testing.assert_allclose(loaded[1].weights[0].weight, originals[1].weight, rtol=1e-6)
    assert loaded[2].weights[0].weight is None

    capsys.readouterr()
    out = tmp_path / "b.json"
    argv = ["--groups", str(saved), "--device", "cpu", "--tokens", "2", "--runs", "2", "--reps", "1",
            "--warmup", "0", "--out", str(out)]
    assert gpu_gemm.main(argv) == 0
    text = capsys.readouterr().out
    assert "### int4.onnx [groups.npz]" in text and "1 group(s) saved as shape only" in text
    sources = json.loads(out.read_text())["sources"]
    assert [s["label"] for s in sources] == ["sparse.onnx [groups.npz]", "int4.onnx [groups.npz]",
                                             "dense.onnx [groups.npz]"]
    int4_row = sources[1]["groups"][0]["timings"][0]
    assert int4_row["int4_ok"] and int4_row["int4_ms"] > 0
    dense_group = sources[2]["groups"][0]
    assert dense_group["timings"][0]["dense_ms"] > 0 and "timed on random values" in dense_group["notes"][0]
