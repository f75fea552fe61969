"""Train a tiny injected Llama with PyTorch's FSDP2 (``fully_shard``) or on one process, and write what it saw.

Used by tests/test_distributed.py: FSDP2 runs on CPU with the gloo backend under ``torchrun``, so the sharded
trajectory can be compared with a single-process run of the same global batch::

    torchrun --nproc_per_node 2 tests/scripts/fsdp2_train.py OUT      # sharded: each rank takes half of each batch
    python tests/scripts/fsdp2_train.py OUT --single                  # one process, the whole batch

``--distill``: the loss is self-distillation instead of the LM loss — the KL of ``hf_layercollapse.Distillation``
towards the library's frozen teacher copy (α = 0, built before sharding and sharded too), summed over each rank's
positions and divided by the positions of the global batch, as ``LayerCollapseTrainer`` does.

OUT receives ``trajectory.json`` (loss, regulariser and α per step) and, from rank 0, ``model.safetensors`` (the
full weights, gathered from the shards after training) and ``saved/`` (``save_pretrained`` of the gathered model).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

import hf_layercollapse as hlc

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 4, 4, 12, 99


def build() -> torch.nn.Module:
    """The injected tiny Llama, identical on every rank (seeded)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    hlc.get_collapse_model(model, hlc.LayerCollapseConfig(reg_weight=0.5, init_alpha=0.2))
    return model


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--single", action="store_true")
    parser.add_argument("--distill", action="store_true")
    args = parser.parse_args()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    out = Path(args.out)
    model = build().train()
    objective = hlc.Distillation(teacher="copy", temperature=2.0)
    teacher = objective.teacher.build(model) if args.distill else None
    if teacher is not None:  # a student well away from its teacher: gradients far above fp32 rounding
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)
    rank, world = 0, 1
    if not args.single:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for module in [model] + ([teacher] if teacher is not None else []):
            for layer in module.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    trajectory = []
    share = GLOBAL_BATCH // world
    for ids in batches():
        local = ids[rank * share:(rank + 1) * share]
        if teacher is None:
            loss = model(input_ids=local, labels=local).loss  # equal token counts per rank: mean of means is exact
        else:
            with torch.no_grad():
                target = teacher(input_ids=local).logits[:, :-1]
            kl = objective.kl(model(input_ids=local).logits[:, :-1], target)  # the positions the LM loss counts
            loss = kl.sum() / (GLOBAL_BATCH * (SEQ - 1)) * world  # FSDP2 averages over ranks: × world sums them
        reg = 0.5 * hlc.regularization_loss(model)  # the terms each activation stored inside its forward
        (loss + reg).backward()  # FSDP2 averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        losses = torch.stack([loss.detach(), reg.detach()])
        if world > 1:
            torch.distributed.all_reduce(losses)
            losses /= world
        alphas = [float(act.last_alpha) for act in hlc.injected_activations(model).values()]
        trajectory.append({"loss": float(losses[0]), "reg": float(losses[1]), "alpha": alphas})
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "trajectory.json").write_text(json.dumps(trajectory))
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        gathered = build()
        gathered.load_state_dict(state)
        gathered.save_pretrained(out / "saved")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
