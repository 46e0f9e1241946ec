"""SAE architectures; importing this package registers them all."""

from sae_core.saes.base import SAE, LossContext, LossOutput
from sae_core.saes.batchtopk import BatchTopKSAE
from sae_core.saes.gated import GatedSAE
from sae_core.saes.jumprelu import JumpReLUSAE
from sae_core.saes.relu import ReLUSAE
from sae_core.saes.topk import TopKSAE

__all__ = ["SAE", "LossContext", "LossOutput", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE"]
