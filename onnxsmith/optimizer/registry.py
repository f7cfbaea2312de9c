"""The pass registry: every built-in pass by the name recipes use."""

from onnxsmith.core.pass_base import Pass
from onnxsmith.passes.awq_scale import AwqScale
from onnxsmith.passes.constant_folding import ConstantFolding
from onnxsmith.passes.constants_to_initializers import ConstantsToInitializers
from onnxsmith.passes.fold_batchnorm import FoldBatchNorm
from onnxsmith.passes.int4_weight import Int4Weight
from onnxsmith.passes.kv_cache_qdq import KvCacheQuantize
from onnxsmith.passes.moe_qdq import MoeQuantize
from onnxsmith.passes.prune_nm import PruneNM
from onnxsmith.passes.ptq_qdq import PtqQuantize
from onnxsmith.passes.qdq_int8 import QuantizeInt8
from onnxsmith.passes.remove_dead_nodes import RemoveDeadNodes
from onnxsmith.passes.reorder_channels import ReorderChannels
from onnxsmith.passes.shape_inference import ShapeInference
from onnxsmith.passes.shuffle_nm import ShuffleNM
from onnxsmith.passes.sparse_conv import SparseGemmToConv
from onnxsmith.passes.upgrade_opset import UpgradeOpset

PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        ShapeInference,
        ConstantsToInitializers,
        ConstantFolding,
        FoldBatchNorm,
        RemoveDeadNodes,
        ReorderChannels,
        UpgradeOpset,
        QuantizeInt8,
        PtqQuantize,
        MoeQuantize,
        KvCacheQuantize,
        AwqScale,
        Int4Weight,
        ShuffleNM,
        PruneNM,
        SparseGemmToConv,
    )
}
