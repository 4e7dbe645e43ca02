"""A multi-process EPO run for tests/test_distributed.py, launched with `accelerate launch` (DeepSpeed ZeRO-2/3, gloo).

    accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_epo_run.py --report_dir DIR [--export_dir DIR] [--uneven_turns] \
        <examples/train_toy.py flags, incl. --ddp_backend gloo>

It trains with `examples/train_toy.py`'s trainer (save_steps=1), then resumes a fresh trainer from checkpoint-1 to the
same max_steps, and writes `DIR/rank<r>.json` per process with: the EPO reference state after training and after the
resume, this process's *local* (pre-reduction) entropy sums per optimizer step, the logged losses, and per rollout the
number of generate calls (turns), of `unwrap_model_for_generation` entries and of ZeRO-3 parameter gathers (counted by
wrapping the real functions, which still run). With `--export_dir` (a PEFT run) it also saves the adapter alone and the
merged model there. With `--uneven_turns` (and `--env_max_turns 3 --max_completion_length 200`), process 0's episodes
end after 2 turns (a smaller token budget) and process 1's after 3.
"""

import json
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))


def pop_flag(argv: list[str], name: str) -> str:
    index = argv.index(name)
    value = argv[index + 1]
    del argv[index : index + 2]
    return value


class Probe:
    """Counts, per rollout, generation-time events by wrapping the real functions."""

    def __init__(self):
        self.rollouts: list[dict] = []
        self.current: dict | None = None
        self.local_steps: list[dict] = []
        self.rows_scheduled: list[list[int]] = []  # per rollout: ids of the rows this process scheduled
        self.rows_trained: list[int] = []  # ids of the real rows this process trained on

    def install(self):
        import deepspeed
        import trl.models

        from trl_epo import rollout as rollout_module
        from trl_epo.trainer import EPOTrainer

        probe = self
        real_gathered = deepspeed.zero.GatheredParameters

        class CountingGatheredParameters(real_gathered):
            def __init__(self, params, *args, **kwargs):
                params = list(params) if not hasattr(params, "ds_id") else [params]
                super().__init__(params, *args, **kwargs)
                if probe.current is not None:
                    probe.current["gathers"].append(len(params))

        deepspeed.zero.GatheredParameters = CountingGatheredParameters

        real_unwrap = trl.models.unwrap_model_for_generation

        def counting_unwrap(*args, **kwargs):
            if probe.current is not None:
                probe.current["unwraps"] += 1
            return real_unwrap(*args, **kwargs)

        trl.models.unwrap_model_for_generation = counting_unwrap

        real_play = rollout_module.MultiTurnRollout.play

        def counting_play(self, tasks, generator, tokenizer):
            probe.current = {"gathers": [], "unwraps": 0, "all_generate_calls": 0}
            try:
                batch = real_play(self, tasks, generator, tokenizer)
            finally:
                record, probe.current = probe.current, None
            record.update(
                tasks=[[t.task, t.variation, t.seed] for t in tasks],
                generate_calls=batch.stats.generate_calls,
                episodes=len(batch.episodes),
                max_turns=max(e.turns for e in batch.episodes),
            )
            probe.rollouts.append(record)
            return batch

        rollout_module.MultiTurnRollout.play = counting_play

        real_generate = rollout_module.TrainerGenerator.generate

        def counting_generate(self, contexts, limits):
            if probe.current is not None:  # every call, including the empty ones that keep processes in lockstep
                probe.current["all_generate_calls"] += 1
            return real_generate(self, contexts, limits)

        rollout_module.TrainerGenerator.generate = counting_generate

        real_end_of_step = EPOTrainer._end_of_optimizer_step

        def recording_end_of_step(self):
            window = self._entropy_window
            if window.turn_sum is not None:  # this process's own sums, before the cross-process reduction
                probe.local_steps.append(
                    {"sum": window.turn_sum.sum().item(), "count": window.turn_count.sum().item()}
                )
            return real_end_of_step(self)

        EPOTrainer._end_of_optimizer_step = recording_end_of_step

        from trl_epo.row_training import RowTrainingMixin

        real_score, real_chunk_inputs = RowTrainingMixin._score_rollout, RowTrainingMixin._chunk_inputs

        def recording_score(self, inputs):
            micro = real_score(self, inputs)
            probe.rows_scheduled.append([id(row) for mb in micro for row in mb.rows])
            return micro

        def recording_chunk_inputs(self, chunk, counts):
            probe.rows_trained.extend(id(row) for row in chunk if row.episode >= 0)
            return real_chunk_inputs(self, chunk, counts)

        RowTrainingMixin._score_rollout = recording_score
        RowTrainingMixin._chunk_inputs = recording_chunk_inputs


def critic_report(trainer, path: str) -> dict | None:
    """PPO runs: the critic's parameters as this process sees them (ZeRO-3: gathered), saved to `path`
    (safetensors) and summarised by a digest of their exact bytes. None without a critic."""
    import contextlib
    import hashlib

    critic = getattr(trainer, "critic", None)
    if critic is None:
        return None
    named = list(critic.model.named_parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    from safetensors.torch import save_file

    digest = hashlib.sha256()
    values = {}
    with gather:
        for name, p in named:
            values[name] = p.detach().float().cpu().clone().contiguous()
            digest.update(values[name].numpy().tobytes())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(values, path)
    return {"digest": digest.hexdigest(), "path": path}


def make_uneven(trainer, training_args):
    """Process 0 gets a smaller episode token budget, so its episodes are cut after 2 turns while process 1's play 3,
    as when one process draws longer episodes: the rollout must keep the processes in lockstep (under ZeRO-3,
    generation runs collectives). The turn limit stays the same everywhere, as in a real run."""
    from trl_epo.rollout import RolloutConfig

    config = RolloutConfig.from_args(training_args, env="toy")
    if trainer.accelerator.process_index == 0:
        config.max_episode_tokens = 96
    trainer.env_rollout.config = config


def main():
    argv = sys.argv[1:]
    report_dir = pop_flag(argv, "--report_dir")
    export_dir = pop_flag(argv, "--export_dir") if "--export_dir" in argv else None
    uneven_turns = "--uneven_turns" in argv
    if uneven_turns:
        argv.remove("--uneven_turns")
    probe = Probe()
    probe.install()

    import torch
    from train_toy import build_trainer, make_parser

    script_args, training_args, model_args = make_parser(argv).parse_args_and_config(args=argv)
    trainer = build_trainer(script_args, training_args, model_args)
    if uneven_turns:
        make_uneven(trainer, training_args)
    n_params = len(list(trainer.model.parameters()))
    rank = trainer.accelerator.process_index
    initial_critic = critic_report(trainer, os.path.join(report_dir, f"critic_initial_rank{rank}.safetensors"))
    trainer.train()
    trained = {
        "reference": trainer.epo_reference.state_dict(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
        "rollouts": probe.rollouts,
        "local_steps": probe.local_steps,
        "rows_scheduled": [len(ids) for ids in probe.rows_scheduled],
        "rows_trained_once": sorted(probe.rows_trained) == sorted(i for ids in probe.rows_scheduled for i in ids),
        "critic": critic_report(trainer, os.path.join(report_dir, f"critic_trained_rank{rank}.safetensors")),
        "initial_critic": initial_critic,
        "critic_logs": [
            {k: v for k, v in h.items() if k.startswith("critic/")} for h in trainer.state.log_history if "loss" in h
        ],
    }
    trainer.save_model(training_args.output_dir)
    if export_dir is not None:  # PEFT runs: the adapter alone and the merged model (ZeRO-3 gathers for both)
        trainer.save_adapter(os.path.join(export_dir, "adapter"))
        trainer.save_merged_model(os.path.join(export_dir, "merged"))
    rank = trainer.accelerator.process_index
    world = trainer.accelerator.num_processes
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0
    trainer.accelerator.wait_for_everyone()
    del trainer

    # Resume a fresh trainer from the first checkpoint and finish the run again. Fresh arguments reset accelerate's
    # process state (a second Accelerator cannot take a DeepSpeed plugin), as a new launch would.
    probe.rollouts, probe.local_steps, probe.rows_scheduled, probe.rows_trained = [], [], [], []
    script_args, training_args, model_args = make_parser(argv).parse_args_and_config(args=argv)
    checkpoint = os.path.join(training_args.output_dir, "checkpoint-1")
    resumed = build_trainer(script_args, training_args, model_args)
    if uneven_turns:
        make_uneven(resumed, training_args)
    resumed.train(resume_from_checkpoint=checkpoint)
    report = {
        "rank": rank,
        "world_size": world,
        "zero_stage": zero_stage,
        "num_model_params": n_params,
        "trained": trained,
        "resumed": {
            "reference": resumed.epo_reference.state_dict(),
            "losses": [h["loss"] for h in resumed.state.log_history if "loss" in h],
            "global_step": resumed.state.global_step,
            "rollouts": probe.rollouts,
            "rows_trained": len(probe.rows_trained),
            "critic": critic_report(resumed, os.path.join(report_dir, f"critic_resumed_rank{rank}.safetensors")),
            "critic_logs": [
                {k: v for k, v in h.items() if k.startswith("critic/")}
                for h in resumed.state.log_history
                if "loss" in h
            ],
        },
        "torch_threads": torch.get_num_threads(),
    }
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    resumed.end()  # releases the distributed model, then destroys the process group


if __name__ == "__main__":
    main()
