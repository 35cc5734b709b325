"""Runs an app (pretrain/main.py, finetune/main.py) under accelerate's FSDP2 on CPU processes that talk through gloo,
so that the tests exercise the trainer's FSDP path on machines without GPUs:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/1node_8gpu_fsdp.yaml \
        --num_processes 2 --mixed_precision no tests/fsdp_cpu.py pretrain/main.py --config ... [key=value ...]

Why it exists: accelerate 1.15 gates FSDP on the device type. `AcceleratorState.__init__` (accelerate/state.py)
turns a run into `DistributedType.FSDP` and keeps its `fsdp_plugin` only inside its branch for MULTI_GPU,
MULTI_XPU, MULTI_NPU, ...; on CPUs the run stays `MULTI_CPU`, the plugin is dropped, and `prepare` wraps the
model in DDP without a word. torch's FSDP2 (`fully_shard`, DTensor, distributed checkpoints) runs on CPU with
gloo. This shim changes only that device check: once accelerate has set up its state, a MULTI_CPU run that was
given an FSDP plugin becomes FSDP with that plugin, as state.py does for GPUs. Everything else is the real code:
our trainer, accelerate's `prepare` / `fsdp2_prepare_model`, torch's `fully_shard` and DCP.

The plugin's CUDA-only setup stays out of reach without changing anything here: `sync_module_states` is obsolete
in FSDP2 (the plugin unsets it); FSDP1, where it is on by default, fails on CPUs inside the plugin
(FullyShardedDataParallelPlugin.__post_init__: "There are currently no available devices found, must be one of
'XPU', 'CUDA', ..."), and the trainer refuses FSDP1 anyway. `cpu_ram_efficient_loading` is off in the shipped
config (the trainer refuses it: accelerate's loader for it takes only Transformers models).
"""

import functools
import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


@functools.wraps(_accelerator_state_init)
def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP  # the lines of state.py's GPU branch
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


if __name__ == "__main__":
    AcceleratorState.__init__ = _fsdp_on_cpu
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)  # as if the app had been launched itself
    runpy.run_path(script, run_name="__main__")
