"""B-STaR: balanced self-taught reasoning on top of the engine, in the order an iteration uses it
(controller.py drives it):

    config.py       RunConfig: everything a run depends on (config.json of a run directory)
    tasks.py        GSM8K / MATH JSONL -> Example, and the prompt template
    search.py       the (temperature, threshold) whose selection has the best balance score
    balance.py      the balance score of a selection
    rewards.py      answer verification: grade a response against the gold answer
    selection.py    score = correct + scaled PRM; threshold, dedup and a per-query cap
    metrics.py      greedy accuracy, Pass@k, Reward@k, diversity
    memory_plan.py  a run's per-phase device memory plan (pure functions)
    memory.py       the run's plan from its options, and the train phase (engines asleep while training)
    controller.py   the loop: search, generate, reward and select, fine-tune, hand off, evaluate, resume
"""
