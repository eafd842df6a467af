"""PyTorch integration: every compiled op runs as a `torch.library` custom op in the `ssmc::`
namespace (fake/meta shapes from the IR, autograd through the backend's `kernel.backward`), so
ssmc ops work eagerly, under autograd and inside `torch.compile(fullgraph=True)`."""
from .ops import TorchOp, torch_op_for

__all__ = ["TorchOp", "torch_op_for"]
