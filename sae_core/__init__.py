"""sae_core: SAE architectures, training and maths in pure torch/numpy.

Never imports prefect, polars or great_expectations (checked by the test suite).
"""

from sae_core.config import PAnnealConfig, SAEConfig, TrainConfig
from sae_core.ensemble import Ensemble
from sae_core.io import load_ensemble, load_sae, save_ensemble, save_sae
from sae_core.registry import architectures, get_architecture, register_architecture
from sae_core.saes import SAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from sae_core.training.ensembles import (
    EnsembleTrainResult,
    expanded_config,
    train_bagging,
    train_boosting,
    train_expanded,
    train_single,
)
from sae_core.training.trainer import TrainResult, build_sae, train_sae

__all__ = [
    "SAEConfig",
    "TrainConfig",
    "PAnnealConfig",
    "SAE",
    "ReLUSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "GatedSAE",
    "build_sae",
    "train_sae",
    "TrainResult",
    "save_sae",
    "load_sae",
    "Ensemble",
    "EnsembleTrainResult",
    "train_single",
    "train_bagging",
    "train_boosting",
    "train_expanded",
    "expanded_config",
    "save_ensemble",
    "load_ensemble",
    "architectures",
    "get_architecture",
    "register_architecture",
]
