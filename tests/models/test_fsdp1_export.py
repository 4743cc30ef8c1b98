"""FSDP1 at world size 1 (one GPU, or one CPU process) runs NO_SHARD; exporting the adapter must still work."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from effilora_lightning.models.sharding import gathered_for_export
linear = torch.nn.Linear(4, 3)
expected = linear.weight.detach().clone()
root = FullyShardedDataParallel(linear, device_id=torch.device("cpu"))  # FULL_SHARD asked, NO_SHARD run
assert root.sharding_strategy == ShardingStrategy.NO_SHARD
with gathered_for_export(root):
    weight = dict(root.named_parameters())["weight"]
    assert weight.shape == (3, 4) and torch.equal(weight.detach(), expected), weight.shape
print("exported")
dist.destroy_process_group()
"""


def test_fsdp1_at_world_size_1_gathers_for_export_without_offload(tmp_path):
    import os

    env = os.environ | {"PORT": str(29600 + os.getpid() % 300)}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "exported" in done.stdout, done.stderr[-2000:]
