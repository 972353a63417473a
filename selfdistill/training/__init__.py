"""Training rounds: LoRA SFT and DPO-family training of the student in a child process.

Parts (importing this package does no work and imports nothing heavy):

- `spec.py`   `RoundSpec` (what the daemon asks for) and `TrainingResult` (what it gets back),
              and `DATA_FORMAT`, the JSONL file of SFT rows and pairs the daemon writes.
- `run.py`    the child: `python -m selfdistill.training SPEC.json` trains one round with TRL +
              peft and writes the adapter atomically and the result JSON (exit 0 on success or
              skip, 6 on failure).
- `guards.py` NaN / exploding gradient / flat loss / collapsed margin checks (pure).
- `child.py`  the daemon side: `run_training_child(spec, launcher, num_processes, time_limit_s,
              stop_event)` runs the child in its own process group, enforces the time limit and
              cold stops by killing the group, and reports how the child ended; `kill_group(pid)`.

The daemon's part, in short::

    spec = RoundSpec(round_id=7, attempt=1, base_model_dir=base, incumbent_adapter_dir=current,
                     output_dir=state / "checkpoints" / "ckpt-000007", data_path=data_jsonl,
                     system_prompt=policy.student.system_prompt,
                     training=policy.training.model_dump(), lora=policy.student.lora.model_dump(),
                     result_path=state / "runs" / "round-7-attempt-1.json", threads=2, seed=7,
                     hf_home=state / "hf")
    result = run_training_child(spec, policy.training.launcher, policy.training.num_processes,
                                policy.training.time_limit_s, stop_event)
    # result.status in {"succeeded", "failed", "skipped"}; result.reason; result.metrics

Scale-out
---------
One entry point for every launcher; only rank 0 saves the adapter and writes the result.

- CPU, several processes: `launcher = "torchrun"`, `num_processes = N`. The child runs under
  `python -m torch.distributed.run --nproc_per_node N --master_addr 127.0.0.1 --master_port P`
  and sets `use_cpu=True, ddp_backend="gloo"` itself (tested with N = 2). `accelerate launch
  --cpu` runs a single process on CPU: do not use it for scale-out on CPU.
- GPUs, data parallel: `launcher = "torchrun"` or `"accelerate"` with `num_processes` = GPUs;
  NCCL and bf16 are picked automatically when CUDA is present.
- GPUs, sharded (model too big for one GPU): `launcher = "accelerate"` with an accelerate config
  file passed as `run_training_child(..., accelerate_config=PATH)`. DeepSpeed ZeRO-3::

      compute_environment: LOCAL_MACHINE
      distributed_type: DEEPSPEED
      deepspeed_config:
        zero_stage: 3
        zero3_init_flag: false        # the child loads the base before the accelerator starts
        zero3_save_16bit_model: true
        offload_optimizer_device: none   # "cpu" to trade speed for GPU memory
        offload_param_device: none
      mixed_precision: bf16
      num_machines: 1
      num_processes: 8

  FSDP::

      compute_environment: LOCAL_MACHINE
      distributed_type: FSDP
      fsdp_config:
        fsdp_version: 2
        fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
        fsdp_cpu_ram_efficient_loading: true
        fsdp_state_dict_type: FULL_STATE_DICT
        fsdp_reshard_after_forward: true
      mixed_precision: bf16
      num_machines: 1
      num_processes: 8

  Several nodes: add `num_machines`, `machine_rank`, `main_process_ip` and `main_process_port`
  per node. Not yet done for sharded runs: rank 0 saves with `model.save_pretrained`, which is
  right for DDP (every rank holds full LoRA weights) but would save shards under ZeRO-3 / FSDP;
  those need the adapter gathered first (`trainer.accelerator.get_state_dict(trainer.model)` on
  every rank). Neither sharded setting has been run on GPUs yet.
"""
