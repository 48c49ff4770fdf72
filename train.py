"""
Train SOHO: pre-training (Sec. 3, 4.1) and the four downstream fine-tunings (Sec. 4.2), from a laptop CPU to many
GPUs. (Work in progress: the training loop follows.)
"""

import contextlib
import os

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python train.py` sets none of them
# ----------------------------------------------------------------------------------------------------------------


def setup_distributed():
    """Returns (rank, world_size, local_rank, device). Starts a process group only under torchrun: NCCL when
    this process has a GPU, gloo otherwise (the same code runs on CPU, which is how the tests run it)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1 and "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, 0, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=dist.get_default_backend_for_device(device))
    return rank, world_size, local_rank, device


def autocast_context(device, amp):
    """torch.amp autocast for amp in {"bf16", "fp16", "off"}; bf16 works on CPU too."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)
