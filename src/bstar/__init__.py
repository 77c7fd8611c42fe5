"""B-STaR: balanced self-taught reasoning on top of the engine.

The loop, in the order an iteration runs it (bstar.controller drives it):

    config.py      RunConfig: everything a run depends on (config.json of a run directory)
    tasks.py       GSM8K / MATH JSONL -> Example, and the prompt template
    search.py      the (temperature, threshold) whose selection has the best balance score
    balance.py     the balance score of a selection
    rewards.py     answer verification: grade a response against the gold answer
    selection.py   score = correct + scaled PRM; threshold, dedup and a per-query cap
    train/         the FSDP2 SFT trainer the selection is fine-tuned with
    metrics.py     greedy accuracy, Pass@k, Reward@k, diversity
    controller.py  the loop: search, generate, reward and select, fine-tune, hand off, evaluate, resume
    plots.py       figures and report.md of a run; report.py redraws them from a run directory
    embedded/      the built-in task, its tokenizer, policy and PRM (no download needed)
    cli/           the `bstar-engine` command line, one module per subcommand
    jsonl.py       JSONL reading with line-numbered errors, atomic writing
    dist_utils.py  process groups (torchrun's, or one rank for offload): records as bytes, barrier, timeout
    memory.py      the run's memory plan, and the train phase (engines asleep, trainer freed before waking)
"""
