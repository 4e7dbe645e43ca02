"""Entry point of an EnvPool worker process: ``python -m trl_epo.envs._worker FD PARENT_PID``."""

import sys

from trl_epo.envs.pool import _worker_main


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]))
