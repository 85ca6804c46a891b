"""Worker for tests/test_contrastive.py: run with torch.distributed.run --nproc_per_node 2.

Every rank builds the same random model and the same global batch of queries + passages, keeps
its share (rank r: queries r*B..(r+1)*B and their groups), computes the cross-rank InfoNCE with
ContrastiveModule, back-propagates world * loss as the step core (llara_fast.train.step) does (with
"grad_cache": runs its 2 queries as 2 GradCache micro-batches through the step core itself),
and sums the parameter gradients over ranks / world. Rank 0 saves the summed loss and the gradients."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llara_fast.data.packing import pack_encode_reference
from llara_fast.objectives.contrastive import ContrastiveConfig, ContrastiveModule

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # test_contrastive and the tests' conftest
from test_contrastive import GROUP, Q_TOTAL, TEMPERATURE, global_batch, micro_batches, step_grads, tiny_model  # noqa: E402


def main(out_path: str, grad_cache: bool = False):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, template = tiny_model()
    queries, passages = global_batch(template)
    B = Q_TOTAL // world
    qs = queries[rank * B:(rank + 1) * B]
    ps = passages[rank * B * GROUP:(rank + 1) * B * GROUP]
    batch, special = pack_encode_reference(qs + ps, template, ["query"] * B + ["passage"] * len(ps), 1 << 30)
    if grad_cache:  # the rank's 2 queries as 2 micro-batches of 1, through the step core
        mbs = micro_batches(template, qs, ps, GROUP, 1)
        raw, stats, _ = step_grads(model, mbs, grad_cache=True)
        total = torch.tensor(stats.parts[0], dtype=torch.float64)
    else:
        module = ContrastiveModule(model, ContrastiveConfig(temperature=TEMPERATURE, cross_rank=True))
        loss, _ = module(batch, special, B, GROUP, Q_TOTAL)
        (loss * world).backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        raw = {name: p.grad for name, p in model.named_parameters()}
    grads = {}
    for name, g in raw.items():
        g = g.clone()
        dist.all_reduce(g)
        grads[name] = g / world
    if rank == 0:
        torch.save({"loss": total, "grads": grads}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], grad_cache=sys.argv[2:] == ["grad_cache"])
