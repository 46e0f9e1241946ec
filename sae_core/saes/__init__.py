"""SAE architectures; importing this package registers them all.

Every module of this package is imported here, so a new architecture is one file: a
subclass of :class:`SAE` decorated with ``@register_architecture("name")`` that sets its
``sparsity`` kind. Config validation, the CLI and the stage configs read the registry.
"""

import importlib
import pkgutil

from sae_core.saes.base import SAE, LossContext, LossOutput

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from sae_core.saes.batchtopk import BatchTopKSAE  # noqa: E402
from sae_core.saes.gated import GatedSAE  # noqa: E402
from sae_core.saes.jumprelu import JumpReLUSAE  # noqa: E402
from sae_core.saes.matryoshka import MatryoshkaSAE  # noqa: E402
from sae_core.saes.ordered import OrderedSAE  # noqa: E402
from sae_core.saes.relu import ReLUSAE  # noqa: E402
from sae_core.saes.topk import TopKSAE  # noqa: E402

__all__ = ["SAE", "LossContext", "LossOutput", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "MatryoshkaSAE",
           "OrderedSAE"]
