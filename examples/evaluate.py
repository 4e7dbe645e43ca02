"""Evaluate a trained agent on an environment split: success rate with a Wilson 95% confidence interval, mean turns,
invalid-turn rate; results are added to `<model>/eval_results.json` (`trl_epo.results`).

    python examples/evaluate.py --model out/checkpoint-100 --env sciworld --split iid ood
    python examples/evaluate.py --model out/lora-adapter --env alfworld --split ood --num_episodes 200 --seeds 0 1 2
    python examples/evaluate.py --config eval.yaml        # the same arguments from a YAML file (TrlParser)

`trl-epo evaluate ...` runs the same program. Defaults: the whole split, temperature 0.4 (the paper's validation
temperature), and the environment, prompts and turn limits of the training run when the model directory (or its
parent) holds the run's `epo_run.json`.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl_epo.cli import evaluate_main as main  # noqa: E402


if __name__ == "__main__":
    main()
