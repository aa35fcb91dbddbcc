"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node 2``: FSDP2 on CPU processes over gloo.

Each model kind (native VKT with a softmax layer, converted Llama hybrid) is sharded as accelerate's FSDP2
config shards it -- ``fully_shard`` on every module of a ``_no_split_modules`` class, then on the root -- and
trained two steps, each rank on its own batch. The full parameters after those steps must equal plain
single-process training on the mean of both ranks' losses (what data parallelism computes). Prints one
``ok <kind>`` line per model kind on rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import vkt_hf
from tests.helpers import tiny_base, tiny_model


def build(kind: str) -> torch.nn.Module:
    if kind == "native":
        return tiny_model("default", layer_types=["vkt", "softmax"]).train()
    return vkt_hf.convert_to_vkt(tiny_base("llama"), layers=[1, 3], local_attention_window=4).train()


def batches(vocab: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(3, vocab, (2, 12), generator=gen) for _ in range(2)]


def shard(model: torch.nn.Module, mesh) -> int:
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(units)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for kind in ("native", "hybrid"):
        vocab = build(kind).get_input_embeddings().num_embeddings
        reference = build(kind)
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for step in range(2):
            loss = sum(
                reference(ids, labels=ids, use_cache=False).loss
                for ids in (batches(vocab, r)[step] for r in range(world))
            )
            (loss / world).backward()
            optimizer.step()
            optimizer.zero_grad()
        sharded = build(kind)
        units = shard(sharded, mesh)
        assert units == sharded.config.num_hidden_layers, units
        optimizer = torch.optim.SGD(sharded.parameters(), lr=0.1)
        for step in range(2):
            ids = batches(vocab, rank)[step]
            sharded(ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        for (name, ours), theirs in zip(sharded.named_parameters(), reference.parameters()):
            full = ours.full_tensor() if hasattr(ours, "full_tensor") else ours
            assert torch.allclose(full, theirs, atol=1e-5), (kind, name, float((full - theirs).abs().max()))
        if rank == 0:
            print(f"ok {kind} ({units} decoder layers sharded over {world} CPU processes)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
