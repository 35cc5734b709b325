"""Run by test_knn under `accelerate launch` on two gloo processes: the k-NN of fixed features with the bank and the
queries split unevenly over the ranks (`sharded_neighbours`), for class ids and for multi-hot labels, and the
scores gathered on the main process. Each rank writes what it got to OUT/rank{r}.pt; the test compares with
one process, on the same cases (CASES, fixed_case).

    dist_knn_shards.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from engine.gather import gather_on_main
from engine.knn import sharded_neighbours, vote

# (name, bank rows of rank 0 and rank 1, queries of rank 0 and rank 1, k, multi-hot): rank 1's bank shard has
# fewer rows than k in the first case, and no queries in the second.
CASES = (("uneven", (23, 4), (9, 5), 10, False), ("no_queries_on_rank1", (12, 18), (13, 0), 5, False),
         ("multi_hot", (15, 16), (6, 7), 8, True))
NUM_CLASSES, DIM, TEMPERATURE = 5, 6, 0.1


def fixed_case(bank_rows: int, query_rows: int, multi_hot: bool, seed: int) -> dict[str, torch.Tensor]:
    """The whole bank and all queries of a case, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    if multi_hot:
        labels = (torch.rand(bank_rows + query_rows, NUM_CLASSES, generator=generator) < 0.4).float()
    else:
        labels = torch.randint(0, NUM_CLASSES, (bank_rows + query_rows,), generator=generator)
    return {"bank": torch.randn(bank_rows, DIM, generator=generator), "bank_labels": labels[:bank_rows],
            "queries": torch.randn(query_rows, DIM, generator=generator), "labels": labels[bank_rows:]}


def rank_share(rows: torch.Tensor, counts: tuple[int, int], rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return rows[start: start + counts[rank]]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    results = {}
    for seed, (name, bank_counts, query_counts, k, multi_hot) in enumerate(CASES):
        case = fixed_case(sum(bank_counts), sum(query_counts), multi_hot, seed)
        bank = F.normalize(rank_share(case["bank"], bank_counts, rank), dim=1)
        queries = F.normalize(rank_share(case["queries"], query_counts, rank), dim=1)
        similarity, labels = sharded_neighbours(accelerator, bank, rank_share(case["bank_labels"], bank_counts, rank),
                                                queries, k, chunk=4)
        scores = vote(similarity, labels, NUM_CLASSES, TEMPERATURE)
        results[name] = {"scores": scores, "on_main": gather_on_main(accelerator, scores,
                                                                     rank_share(case["labels"], query_counts, rank))}
    torch.save(results, out / f"rank{rank}.pt")
    accelerator.end_training()
