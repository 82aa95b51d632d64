"""Lightning's ``ModelParallelStrategy`` with the data-parallel size derived from the world size.

MIGE shards with FSDP2 only (no tensor parallelism), so its data-parallel group is every rank:
``num_nodes × devices``. Lightning's own ``data_parallel_size="auto"`` means the number of *nodes*
(it pairs with ``tensor_parallel_size="auto"`` = the devices of one node), which with
``tensor_parallel_size: 1`` is wrong as soon as a node has more than one device. Here ``"auto"``
with an integer tensor-parallel size means ``world size / tensor_parallel_size``, so 8 GPUs need
one override (``--trainer.devices=8``), not two. Both ``"auto"`` keep Lightning's meaning; an
integer is used as given.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def resolved_data_parallel_size(self) -> Literal["auto"] | int:
        """The data-parallel size the device mesh will get (``"auto"`` left to Lightning when the
        tensor-parallel size is ``"auto"`` too); needs the trainer's devices and nodes."""
        dp, tp = self._data_parallel_size, self._tensor_parallel_size
        if dp != "auto" or tp == "auto":
            return dp
        world = self.num_nodes * self.num_processes
        if tp < 1 or world % tp:
            raise ValueError(
                f"trainer.strategy.init_args.tensor_parallel_size={tp} does not divide the world size "
                f"{world} (num_nodes {self.num_nodes} × devices {self.num_processes})"
            )
        return world // tp

    def setup_environment(self) -> None:
        self._data_parallel_size = self.resolved_data_parallel_size()
        super().setup_environment()
