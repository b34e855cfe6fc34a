"""Training with parameters sharded over processes (FSDP2, torch's ``fully_shard``, set up by accelerate).

Three things change for posttrain when every process holds only a slice of each parameter:

- a forward pass is collective (each layer gathers its parameters from all processes as it runs), so every process
  must run the same number of forward passes: the micro-batches of a step and held-out evaluation are evened out;
  generation, whose passes per process depend on what each samples, runs on gathered parameters (``gathered``: the
  whole model on every process meanwhile, as TRL's generation under ZeRO-3);
- a checkpoint is written in parts, each process its own (``torch.distributed.checkpoint``, under ``sharded/``),
  and can be read back by any number of processes (``posttrain export`` reads one in a single process);
- ``final/`` is consolidated: the parameters are gathered into ordinary tensors on the main process, which then
  saves (and merges adapters) exactly as an unsharded run does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from posttrain.core.errors import UserError

SHARDED = "sharded"  # a checkpoint's sub-directory written by torch.distributed.checkpoint


def is_sharded(accelerator) -> bool:
    return accelerator is not None and bool(getattr(accelerator, "is_fsdp2", False))


def check_supported(accelerator) -> None:
    """Refuse launches whose sharding posttrain's loop does not drive correctly, before any work is done."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed launches are not supported: DeepSpeed's engine takes the optimizer step inside "
                        "backward(), which bypasses posttrain's step (global loss normalizer, skipped non-finite "
                        "steps, "
                        "exact resume). Shard with FSDP2 instead: recipes/accelerate/fsdp2.yaml (ZeRO-3's memory; "
                        "fsdp_reshard_after_forward: false for ZeRO-2's)")
    if kind == DistributedType.FSDP and not is_sharded(accelerator):
        raise UserError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                        "(recipes/accelerate/fsdp2.yaml)")


def wrap_decoder_layers(accelerator, module: torch.nn.Module) -> None:
    """Shard layer by layer: the task's module wraps the transformers model, whose ``_no_split_modules`` name the
    decoder layer class that accelerate would otherwise look for on the wrapper (and not find)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        inner = next((m for m in module.modules() if getattr(m, "_no_split_modules", None)), None)
        if inner is not None:
            plugin.transformer_cls_names_to_wrap = list(inner._no_split_modules)


def most_over_processes(count: int, accelerator) -> int:
    """The largest ``count`` of any process: how many collective passes every process has to run."""
    if accelerator is None or accelerator.num_processes == 1:
        return count
    tensor = torch.tensor([count], device=accelerator.device)
    return int(accelerator.gather(tensor).max())


def _state_dicts(trained: torch.nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(trained, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=True))
    trainable = {name for name, param in trained.named_parameters() if param.requires_grad}
    # torch keeps a frozen parameter's tied twin (lm_head.weight of tied embeddings): never a checkpoint's business
    return {name: value for name, value in model_state.items() if name in trainable}, optimizer_state


def save_sharded(directory: Path, trained: torch.nn.Module, optimizer) -> None:
    """Every process writes its slices of the trainable parameters and their optimizer state (collective)."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = _state_dicts(trained, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory / SHARDED)


def load_sharded(directory: Path, trained: torch.nn.Module, optimizer) -> None:
    """Read a sharded checkpoint into this run's layout, whatever its process count (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optimizer_state = _state_dicts(trained, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory / SHARDED)  # raises if the checkpoint lacks a requested tensor
    set_state_dict(trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # frozen parameters come from the model, not the checkpoint


def full_trainable_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's trainable parameters as whole tensors, read in one process (for export)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(directory / SHARDED, Path(scratch) / "whole.pt")
        state = torch.load(Path(scratch) / "whole.pt", weights_only=True)
    return {name: value.contiguous() for name, value in state["model"].items()}


def consolidate(module: torch.nn.Module, is_main: bool) -> None:
    """Gather every parameter (collective); on the main process put the whole tensors, on the CPU, in place of the
    shards, so that saving, merging adapters and ``save_pretrained`` see an ordinary model. Tied parameters stay
    tied. The module must not run sharded again afterwards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in replaced:
            replaced[id(param)] = torch.nn.Parameter(whole[name], requires_grad=param.requires_grad)
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = replaced[id(param)]
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = buffer.detach().cpu()


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Whole parameters on every process for the duration, and no passes that gather them again: each process then
    generates on its own, as many decoding passes as its prompts need. Sharded again afterwards (collective on entry
    and exit). Nothing happens for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    units[0]._get_fsdp_state()._lazy_init()  # the root first: a layer's own forward must never become the root
    resharded = [
        any(g.post_forward_mesh_info is not None for g in u._get_fsdp_state()._fsdp_param_groups) for u in units
    ]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in zip(units, resharded):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)
        _forget_forwards(units)


def _forget_forwards(units: list) -> None:
    """FSDP2 records the order of forward passes to prefetch parameters in the next backward, and clears it only
    after a backward. Passes while gathered (a different number per process, or on the main process alone) would
    make the processes prefetch different layers, that is, wait on different collectives: forget them."""
    root = units[0]._get_fsdp_state()
    root._comm_ctx.post_forward_order.clear()
    for unit in units:
        for group in unit._get_fsdp_state()._fsdp_param_groups:
            group._post_forward_indices.clear()
