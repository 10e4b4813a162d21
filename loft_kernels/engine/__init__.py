"""The training engine behind the `loft` CLI and the recipes in python/, one job per module.

- config: `TrainConfig`, how to train (method, LoFT settings, SGD hyper-parameters).
- model_files: model specs, model files (`save_model`/`load_model_file`), full and ticket models.
- trainers: dense, simulated-LoFT and distributed-LoFT trainers (`make_trainer`).
- distributed: joining a torchrun job (`init_distributed`) and the engine's collectives.
- evaluation: `evaluate` the full model, `recalibrate_bn` after LoFT pretraining.
- loop: `fit`, the epoch loop.
- checkpoints: resumable run checkpoints (`save_run`/`load_run`) and metrics files.
- pretrain / finetune: the resumable jobs (`pretrain_run`, `load_pretrained`, `finetune_run`).
"""
from .checkpoints import load_run, save_run, write_metrics
from .config import MEMORY_FORMATS, METHODS, SCHEDULES, TrainConfig, resolve_memory_format
from .distributed import NotUnderTorchrun, init_distributed
from .evaluation import evaluate, recalibrate_bn
from .finetune import finetune_run
from .loop import fit
from .model_files import (
    build_model,
    full_model,
    groups_from_list,
    groups_to_list,
    load_model_file,
    model_spec,
    pruned_skeleton,
    save_model,
    ticket_model,
)
from .pretrain import DEFAULT_EMERGENCE, emergence_epochs, load_pretrained, pretrain_run
from .trainers import DenseTrainer, DistributedLoftTrainer, SimulatedLoftTrainer, Trainer, make_trainer

__all__ = [
    "TrainConfig", "METHODS", "SCHEDULES", "MEMORY_FORMATS", "resolve_memory_format",
    "build_model", "model_spec", "groups_to_list", "groups_from_list", "save_model", "load_model_file",
    "full_model", "ticket_model", "pruned_skeleton",
    "Trainer", "DenseTrainer", "SimulatedLoftTrainer", "DistributedLoftTrainer", "make_trainer",
    "init_distributed", "NotUnderTorchrun", "evaluate", "recalibrate_bn", "fit", "save_run", "load_run", "write_metrics",
    "DEFAULT_EMERGENCE", "emergence_epochs", "pretrain_run", "load_pretrained", "finetune_run",
]
