"""The task operator ``T_φ``: a pretrained network with an explicit frozen / fine-tuned split.

In task-adapted bilevel learning (reference §3.4) the upper loss is ``ℓ(T_φ(x̂(θ)), s)``; the
parameters ``φ`` of ``T`` are either all frozen (a fixed pretrained ``T*``) or partly
fine-tuned by the outer loop's ``param_optimizer``. :class:`TaskOperator` picks the fine-tuned
blocks

* by name: ``finetune=["up2", "up3", "outc"]`` — parameter-name prefixes (a prefix matches the
  parameter ``p`` when ``p == prefix`` or ``p`` starts with ``prefix + "."``);
* or as the last ``K`` top-level children that own parameters: ``last=3`` (for
  :class:`recon.models.UNet` that is the last two up-sampling blocks and ``outc``; for a
  torchvision ResNet ``last=2`` is ``layer4`` and ``fc``).

Every other parameter gets ``requires_grad=False``. Frozen modules always stay in eval mode
(batch-norm uses its running statistics, dropout is off), whatever ``.train()`` is called
with; fine-tuned modules follow ``.train(mode)``. A new ``TaskOperator`` starts in eval mode.
It implements the core interface :class:`bilevel.TaskOperator` for networks (parameter and
module names are those of the wrapped ``network``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import Tensor, nn

import bilevel

__all__ = ["TaskOperator", "last_blocks"]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def last_blocks(network: nn.Module, k: int) -> List[str]:
    """Names of the last ``k`` top-level children of ``network`` that hold parameters."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"last must be an int >= 0, got {k!r}")
    names = [n for n, m in network.named_children() if any(True for _ in m.parameters())]
    if k > len(names):
        raise ValueError(f"last={k} exceeds the {len(names)} parameterised top-level blocks "
                         f"of {type(network).__name__}: {names}")
    return names[len(names) - k:] if k else []


class TaskOperator(bilevel.TaskOperator):
    """``T_φ(x) = network(x)`` with the parameters under ``finetune`` (or the ``last`` K
    blocks) trainable and the rest frozen (module docstring); a :class:`bilevel.TaskOperator`.

    Args:
        network: the task network (segmenter or classifier), already pretrained.
        finetune: parameter-name prefixes to keep trainable (``None``/``[]``: none).
        last: alternatively, fine-tune the last ``last`` top-level blocks.

    Examples:
        >>> from recon.models import UNet
        >>> task = TaskOperator(UNet(1, 3, base_channels=4, depth=2), finetune=["outc"])
        >>> task.trainable_names
        ['outc.weight', 'outc.bias']
    """

    def __init__(self, network: nn.Module, finetune: Optional[Sequence[str]] = None,
                 last: Optional[int] = None):
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        if finetune is not None and last is not None:
            raise ValueError(f"give finetune or last, not both (finetune={finetune!r}, last={last!r})")
        if isinstance(finetune, str):
            raise TypeError(f"finetune must be a list of name prefixes, got the string {finetune!r}")
        self.network = network
        self.finetune: List[str] = (list(finetune or []) if last is None
                                    else last_blocks(network, last))
        names = [n for n, _ in network.named_parameters()]
        for prefix in self.finetune:
            if not isinstance(prefix, str):
                raise TypeError(f"finetune entries must be strings, got {prefix!r}")
            if not any(_matches(n, prefix) for n in names):
                raise ValueError(f"finetune prefix {prefix!r} matches no parameter of "
                                 f"{type(network).__name__}; first names: {names[:8]}")
        self.training = False
        self.freeze()

    def task_network(self) -> nn.Module:
        """The wrapped network (names are relative to it)."""
        return self.network

    def finetunes(self, name: str) -> bool:
        """``name`` equals a ``finetune`` prefix or lies below one (``prefix + "."``)."""
        return bool(name) and any(_matches(name, pre) for pre in self.finetune)

    def forward(self, x: Tensor) -> Tensor:
        """``network(x)``."""
        return self.network(x)
