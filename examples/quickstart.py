"""The README's Python example, runnable: generate from a local Hugging Face checkpoint.

    python examples/quickstart.py --model PATH [--device cuda] [--check]

--check compares the engine's greedy tokens with transformers' on the same checkpoint (what CI runs, from
outside the checkout, on a tiny checkpoint made by `python -m bstar.testing.model_factory DIR`).
"""

import argparse

from bstar import LLM, SamplingParams

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--check", action="store_true", help="greedy tokens must equal transformers'")
args = p.parse_args()

llm = LLM(args.model, dtype="float32", device=args.device, seed=0)
prompts = ["Question: two plus three?", "the answer is"]
outs = llm.generate(prompts, SamplingParams(n=4, temperature=0.8, max_tokens=16, logprobs=0))
c = outs[0].outputs[3]
print(
    f"{len(outs)} prompts x {len(outs[0].outputs)} candidates; one: {c.text!r} {c.token_ids} {c.cumulative_logprob:.3f}"
)

greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
if args.check:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    for prompt, out in zip(prompts, greedy):
        ids = torch.tensor([out.prompt_token_ids], device=args.device)
        ref = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
        if ref != list(out.outputs[0].token_ids):
            raise SystemExit(
                f"greedy tokens differ from transformers' for {prompt!r}: {out.outputs[0].token_ids} vs {ref}"
            )
    print(f"greedy tokens equal transformers' on {len(prompts)} prompts")
