"""The shipped accelerate launch configs (configs/accelerate/) load as accelerate reads them and ask for 8 GPUs per
node."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 8 * config.num_machines and config.mixed_precision == "bf16"
    assert (config.num_machines > 1) == bool(config.main_process_ip)


def test_single_and_multi_node_are_shipped():
    assert {load_config_from_file(str(p)).num_machines for p in CONFIGS} == {1, 2}
