"""MSPLoRA under DDP, FSDP2 or DeepSpeed ZeRO-3, with a full-state checkpoint (DDP, FSDP2) that
resumes bit-identically.

The pattern: apply MSPLoRA first (the shared factors live once, at model.msplora_factors, the
root), then shard each decoder block and the root; build the optimizer after sharding.

    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode fsdp --steps 6 --out final.safetensors
    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode fsdp --steps 6 --ckpt-at 3 --ckpt ckpt.pt
    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode fsdp --steps 6 --resume ckpt.pt --out resumed.safetensors
    python examples/train_fsdp.py --mode single --steps 6 --out single.safetensors   # one process, same global batch
    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode zero3 --steps 6 --adapter-dir adapter
    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode zero2 --steps 6 --adapter-dir adapter

Under ZeRO-3 (`pip install deepspeed`; every parameter split across the ranks, however small)
mk.save_adapter is called on every rank: it gathers each factor in turn and rank 0 writes.

Runs on CPUs with gloo (as in the tests) and on GPUs with NCCL. The model is a tiny LLaMA built
from a config, so nothing is downloaded.
"""
from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist

import msplora_kernels as mk


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["single", "ddp", "fsdp", "zero2", "zero3"], required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--ckpt-at", type=int, default=None, help="save a checkpoint after this many steps")
    p.add_argument("--ckpt", default=None, help="checkpoint file to write at --ckpt-at")
    p.add_argument("--resume", default=None, help="checkpoint file to resume from")
    p.add_argument("--out", default=None, help="write the final adapter tensors (safetensors) here")
    p.add_argument("--adapter-dir", default=None, help="also save the final adapter here with mk.save_adapter")
    p.add_argument("--bf16-params", action="store_true",
                   help="fsdp: compute in bfloat16 with fp32 sharded parameters and fp32 gradient reduction "
                        "(MixedPrecisionPolicy)")
    args = p.parse_args(argv)
    if args.bf16_params and args.mode != "fsdp":
        p.error("--bf16-params is FSDP2's MixedPrecisionPolicy: use it with --mode fsdp")
    if args.mode in ("zero2", "zero3") and (args.ckpt_at is not None or args.resume):
        p.error("--ckpt-at and --resume are for ddp and fsdp; under zero3 use DeepSpeed's save_checkpoint")
    return args


def build_model(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every rank builds the same model
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(device)
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=(8, 4, 2)))
    with torch.no_grad():  # train from a non-zero adapter so every factor gets a gradient at step 0
        for name, p in mk.adapter_state_dict(model).items():
            if name.endswith(".B"):
                p.normal_(std=0.02)
    return model


def zero_engine(model, opt, micro_batch, stage):
    """DeepSpeed ZeRO (stage 2: optimizer state and gradients partitioned; stage 3: parameters too,
    every one of them: a persistence threshold of 0, as real models are split anyway) with no
    gradient clipping, as the single process trains."""
    import deepspeed

    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": zero}
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def zero_adapter_tensors(engine, names):
    """The adapter's parameters gathered as DeepSpeed gathers them: what a whole save must hold."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    out = {}
    for name in names:
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
            out[name] = params[name].detach().to("cpu", copy=True)
    return out


def global_batch(step, args, device):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 128, (args.global_batch, args.seq), generator=g).to(device)


def main(argv=None):
    args = parse_args(argv)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    distributed = args.mode != "single"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if rank == 0:
        print(f"{args.mode}: {world} processes", flush=True)

    model = build_model(device)
    adapter_names = list(mk.adapter_state_dict(model))
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        policy = {}
        if args.bf16_params:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, **policy)
        fully_shard(model, mesh=mesh, **policy)  # the root: embeddings, head and the shared MSPLoRA factors
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    zero = args.mode in ("zero2", "zero3")
    if zero:
        model, opt = zero_engine(model, opt, args.global_batch // world, stage=int(args.mode[-1]))

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=False) if rank == 0 else {"model": {}, "optim": {}, "step": 0}
        load_opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
        set_model_state_dict(model, ckpt["model"], options=load_opts)
        set_optimizer_state_dict(model, opt, ckpt["optim"], options=load_opts)
        start_holder = [ckpt["step"]]
        if distributed:
            dist.broadcast_object_list(start_holder, src=0)
        start = start_holder[0]

    per_rank = args.global_batch // world
    for step in range(start, args.steps):
        ids = global_batch(step, args, device)[rank * per_rank:(rank + 1) * per_rank]
        if zero:
            loss = model(input_ids=ids, labels=ids).loss
            model.backward(loss)
            model.step()
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
        if args.ckpt_at is not None and step + 1 == args.ckpt_at:
            state = {"model": get_model_state_dict(model, options=full),
                     "optim": get_optimizer_state_dict(model, opt, options=full), "step": step + 1}
            if rank == 0:
                torch.save(state, args.ckpt)

    if args.out:
        state = zero_adapter_tensors(model, adapter_names) if zero else \
            get_model_state_dict(model, options=full)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: state[k].contiguous() for k in adapter_names}, args.out)
    if distributed and args.mode in ("ddp", "zero2"):
        # Replicated engines: every rank must hold the same factors (the shared ones included).
        local = mk.adapter_state_dict(model.module)
        digest = hashlib.sha256(b"".join(local[k].detach().cpu().numpy().tobytes() for k in sorted(local))).hexdigest()
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if rank == 0:
            print(f"factors identical on every rank: {len(set(digests)) == 1}", flush=True)
    if args.adapter_dir:
        # On every rank: FSDP2's shards and ZeRO-3's partitions are gathered by all, rank 0 writes.
        mk.save_adapter(model.module if zero else model, args.adapter_dir)
    if distributed:
        # Let every rank finish (rank 0 writes files) before tearing gloo down; an unsynchronized
        # teardown can abort a rank with "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
