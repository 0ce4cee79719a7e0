"""Scale-out on torch.distributed: a memory bank sharded across the ranks of a process group."""
from .launch import free_port, spawn_ranks
from .sharded_index import MANIFEST_NAME, ShardedIndex

__all__ = ["ShardedIndex", "MANIFEST_NAME", "spawn_ranks", "free_port"]
