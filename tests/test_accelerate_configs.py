"""The shipped accelerate launch configs (configs/accelerate/) load as accelerate reads them and ask for 8 GPUs per
node; the FSDP ones shard per block with FSDP2 (the version our sharded checkpoints are written for)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    config = load_config_from_file(str(path))
    assert config.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP)
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # our _no_split_modules
    assert config.num_processes == 8 * config.num_machines and config.mixed_precision == "bf16"
    assert (config.num_machines > 1) == bool(config.main_process_ip)


def test_single_and_multi_node_are_shipped_for_ddp_and_fsdp():
    shipped = {(c.num_machines, c.distributed_type) for c in map(load_config_from_file, map(str, CONFIGS))}
    assert shipped == {(n, kind) for n in (1, 2) for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP)}
