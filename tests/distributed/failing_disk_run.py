"""`examples/train_toy.py`, except that process 0's disk fails from the log of optimizer step `--fail_disk_at_step` on:
files cannot grow past 200 kB there (RLIMIT_FSIZE, enforced by the kernel for root too; SIGXFSZ ignored so that the
writes fail with EFBIG "File too large" as a full disk fails them with ENOSPC). The tiny model's weights are 440 kB,
so that step's checkpoint fails half-way on process 0 while process 1 writes its part. For tests/test_faults.py.

    accelerate launch ... tests/distributed/failing_disk_run.py --fail_disk_at_step 2 <train_toy.py flags>
"""

import os
import resource
import signal
import sys


sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
)


def main():
    from train_toy import build_trainer, make_parser
    from transformers import TrainerCallback

    argv = sys.argv[1:]
    index = argv.index("--fail_disk_at_step")
    step = int(argv[index + 1])
    del argv[index : index + 2]

    class DiskFails(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            if state.global_step == step and state.is_world_process_zero:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    script_args, training_args, model_args = make_parser(argv).parse_args_and_config(args=argv)
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.add_callback(DiskFails())
    trainer.train()
    trainer.end()


if __name__ == "__main__":
    main()
