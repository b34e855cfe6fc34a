"""``python tests/fsdp_on_cpu.py ACCELERATE_CONFIG COMMAND RECIPE`` under torchrun: posttrain's CLI with FSDP2
sharding on CPU processes (gloo).

The environment is what ``accelerate launch --config_file ACCELERATE_CONFIG`` gives each process (derived from the
shipped config by accelerate's own launcher code). accelerate 1.15 turns an FSDP config into FSDP only for GPU-like
process groups; this script lifts that one gate, so that posttrain's sharded path (collective forwards kept in step,
sharded checkpoints, consolidated final/) runs for real in tests: torch's ``fully_shard`` itself works on CPU.
"""

import os
import sys


def accelerate_env(config_file: str, processes: int) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "--num_processes", str(processes),
                                               "-m", "posttrain.apps.cli"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_"))}


if __name__ == "__main__":
    config_file, argv = sys.argv[1], sys.argv[2:]
    os.environ.update(accelerate_env(config_file, int(os.environ["WORLD_SIZE"])))
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # the gate: FSDP for GPU-like groups
    from posttrain.apps.cli import main

    sys.argv = ["posttrain", *argv]
    sys.exit(main())
